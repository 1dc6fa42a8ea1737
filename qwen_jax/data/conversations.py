"""Chat data for supervised fine-tuning: conversation records, rendered by a chat template, tokenised
with a mask of the tokens the model learns to write (its own turns and the token that ends each).

A record is a JSON object {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]?} (the
layout of HF chat data sets), or ShareGPT's {"conversations": [{"from": "human", "value": ...}, ...]}.
Which characters an assistant turn wrote is found without knowing the template: the conversation
is rendered again with that turn replaced by a marker, and the turn is what differs. So any
template works (Qwen's drops old reasoning, adds think blocks, writes tool calls) as long as it ends
an assistant turn with a special token of the tokenizer (`<|im_end|>`).
A bad record is skipped and counted by reason (strict: the first one raises, naming it):

    bad_json           the record is not a UTF-8 JSON object
    missing_field      no "messages" (nor "conversations")
    bad_field          "messages" is not a list of objects with a string "role"; "tools" not a list
    no_assistant_turn  nothing for the model to learn
    template_error     the chat template refused the conversation
    encode_error       the tokenizer failed on it
    too_long           more tokens than train.seq_len (a row holds whole conversations)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError
from qwen_jax.data.chat import load_chat_template, render_chat
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import python_docs_corpus, stable_unit_hash
from qwen_jax.data.tokenizer import END_OF_TURN

# ChatML, the layout of Qwen's turns, for runs that bring no template of their own. A message's
# content is a string or a list of parts ({"type": "text", "text": ...}, {"type": "image"}, {"type":
# "video"}); an image or video stands where it is as Qwen's vision placeholder.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- elif message.content %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- else %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LOSS_ON = ("assistant", "all")
# Stand in for an assistant turn; first and last letters differ, so one of the two always ends the
# match with the real turn exactly where the turn starts and ends.
MARKS = ("AQwenJaxTurnMarkA", "ZQwenJaxTurnMarkZ")
TOO_LONG = "too_long"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}


def json_object(record: bytes | str) -> dict:
    """A record's JSON object, or raise Skip("bad_json")."""
    try:
        value = json.loads(record.decode("utf-8") if isinstance(record, bytes) else record)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Skip("bad_json", str(error)) from None
    if not isinstance(value, dict):
        raise Skip("bad_json", f"a JSON {type(value).__name__}, not an object")
    return value


def parse_conversation(record: bytes | str, where: str) -> dict:
    """A JSON record -> {"messages": [...], "tools": [...] or None}, or raise Skip."""
    return check_conversation(json_object(record))


def _from_sharegpt(turns) -> list:
    """ShareGPT's [{"from": "human" | "gpt" | ..., "value": ...}] as messages (other items pass as they are)."""
    if not isinstance(turns, list):
        return turns
    return [{"role": SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn["value"]}
            if isinstance(turn, dict) and isinstance(turn.get("from"), str) and "value" in turn else turn
            for turn in turns]


def check_conversation(value: dict) -> dict:
    """A conversation's {"messages", "tools"} checked, or raise Skip naming what is wrong."""
    if "messages" not in value and "conversations" in value:
        value = {**value, "messages": _from_sharegpt(value["conversations"])}
    if "messages" not in value:
        raise Skip("missing_field", f"no 'messages' (or ShareGPT's 'conversations') among {sorted(value)}")
    messages, tools = value["messages"], value.get("tools")
    if not isinstance(messages, list) or not messages:
        raise Skip("bad_field", "'messages' is not a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise Skip("bad_field", f"messages[{index}] is not an object with a string 'role'")
    if tools is not None and not isinstance(tools, list):
        raise Skip("bad_field", f"'tools' is a {type(tools).__name__}, not a list")
    if not any(message["role"] == "assistant" for message in messages):
        raise Skip("no_assistant_turn", f"roles {[message['role'] for message in messages]}")
    return {"messages": messages, "tools": tools}


def is_held_out_conversation(conversation: dict, fraction: float, seed: int = 0) -> bool:
    """Whether a conversation is held out for eval: a hash of its content, the same on every host."""
    return stable_unit_hash(json.dumps(conversation, sort_keys=True, ensure_ascii=False), seed) < fraction


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over slice compares, which run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


class ChatRenderer:
    """A chat template with its special tokens and kwargs (e.g. enable_thinking): a conversation ->
    its text and the character spans [start, end) its assistant turns wrote."""

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None, **kwargs):
        self.template = template
        self._special_tokens = special_tokens or {}
        self._kwargs = kwargs

    def render(self, messages: list[dict], tools: list | None = None) -> str:
        return render_chat(self.template, messages, add_generation_prompt=False,
                           special_tokens=self._special_tokens, tools=tools, **self._kwargs)

    def __call__(self, conversation: dict) -> tuple[str, list[tuple[int, int]]]:
        """(text, assistant spans); raise Skip("template_error") where the template refuses it."""
        messages, tools = conversation["messages"], conversation.get("tools")
        try:
            text = self.render(messages, tools)
            spans = [self._span(text, messages, index, tools) for index, message in enumerate(messages)
                     if message["role"] == "assistant"]
        except Exception as error:  # noqa: BLE001 - a template may raise anything on a conversation it refuses
            raise Skip("template_error", f"{type(error).__name__}: {error}") from None
        return text, spans

    def _span(self, text: str, messages: list[dict], index: int, tools) -> tuple[int, int]:
        """[start, end) of what assistant turn `index` wrote in `text`: where text and the renders with
        that turn replaced by each of MARKS part ways, from the start and from the end."""
        starts, ends = [], []
        for mark in MARKS:
            probe = self.render([*messages[:index], {"role": "assistant", "content": mark}, *messages[index + 1:]],
                                tools)
            at = probe.find(mark)
            before, after = probe[:at], probe[at + len(mark):]
            # Mostly the turn's surroundings do not depend on what it says: one render shows them.
            if (probe.count(mark) == 1 and len(before) + len(after) <= len(text) and text.startswith(before)
                    and text.endswith(after)):
                return len(before), len(text) - len(after)
            starts.append(_common_prefix(text, probe))
            ends.append(len(text) - _common_suffix(text, probe))
        start = min(starts)
        return start, max(start, *ends)


def trained_tokens(ids, starts: np.ndarray, spans: list[tuple[int, int]], closers: set[int]) -> np.ndarray:
    """bool [tokens] of token `ids` starting at characters `starts` (non-decreasing): those starting
    inside an assistant span, and the special token (one of `closers`) right after each span, which
    ends the turn and teaches the model to stop."""
    trained = np.zeros(len(ids), bool)
    for start, end in spans:
        first, after = np.searchsorted(starts, [start, end])
        trained[first:after] = True
        if after < len(ids) and ids[after] in closers:
            trained[after] = True
    return trained


def token_starts(encoding) -> np.ndarray:
    """int64 [tokens]: the character each token of a tokenizers Encoding starts at."""
    return np.array([start for start, _ in encoding.offsets], np.int64)


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens: those that may end a turn."""
    return {token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def checked_loss_on(loss_on: str) -> str:
    """data.chat_loss, or a ConfigError naming the choices."""
    if loss_on not in LOSS_ON:
        raise ConfigError(f"data.chat_loss is {loss_on!r}; choose one of {LOSS_ON}")
    return loss_on


class TokenizeConversation:
    """A conversation -> (token ids int32 [T <= seq_len], trained bool [T]); raise Skip where it cannot be used."""

    def __init__(self, tokenizer: Tokenizer, renderer: ChatRenderer, *, seq_len: int,
                 loss_on: str = "assistant"):
        self._tokenizer, self._renderer = tokenizer, renderer
        self.seq_len, self._loss_on = seq_len, checked_loss_on(loss_on)
        self._closers = special_ids(tokenizer)

    def __call__(self, conversation: dict) -> tuple[np.ndarray, np.ndarray]:
        text, spans = self._renderer(conversation)
        try:
            encoding = self._tokenizer.encode(text)
        except Exception:  # the tokenizer's error types are undocumented; any one record may fail
            raise Skip("encode_error", "the tokenizer failed on it") from None
        if len(encoding.ids) > self.seq_len:
            raise Skip(TOO_LONG, f"{len(encoding.ids)} tokens, more than train.seq_len {self.seq_len}")
        ids = np.asarray(encoding.ids, np.int32)
        if self._loss_on == "all":
            return ids, np.ones(len(ids), bool)
        return ids, trained_tokens(encoding.ids, token_starts(encoding), spans, self._closers)

    def check(self) -> None:
        """Raise a ConfigError unless a two-turn conversation's reply is learned with a special token ending it."""
        probe = {"messages": [{"role": "user", "content": "Hi."},
                              {"role": "assistant", "content": "Hello."}]}
        try:
            text, spans = self._renderer(probe)
        except Skip as skip:
            raise ConfigError(f"the chat template cannot render a user turn and a reply: {skip.detail}") from None
        encoding = self._tokenizer.encode(text)
        trained = np.flatnonzero(trained_tokens(encoding.ids, token_starts(encoding), spans, self._closers))
        if not len(trained) or encoding.ids[trained[-1]] not in self._closers:
            raise ConfigError(
                "the chat template does not end an assistant turn with a special token of the tokenizer "
                f"(such as {END_OF_TURN}), so a model trained on it would not learn to stop")


def chat_renderer(where: str, init_source: Path | None, kwargs: dict[str, Any]) -> ChatRenderer:
    """data.chat_template's renderer: "" the built-in ChatML, "init_from" the template beside
    init_from's tokenizer, else a .jinja file or an HF directory."""
    if not where:
        return ChatRenderer(CHATML_TEMPLATE, **kwargs)
    if where == "init_from" and init_source is None:
        raise ConfigError("data.chat_template='init_from' takes the template of init_from, which is not set")
    source = init_source if where == "init_from" else Path(where)
    template, special_tokens = load_chat_template(source, f"data.chat_template={where!r}")
    return ChatRenderer(template, special_tokens, **kwargs)


_QUESTIONS = ("What does `{}` do?", "Explain `{}`.", "Summarise the documentation of `{}`.",
              "How do I use `{}`?")
_FOLLOW_UPS = ("Tell me more.", "Go on.", "What else should I know about it?")
_SYSTEM = "You are a concise assistant who knows the Python standard library."
_REST_CHARS = 1200  # of a docstring's later paragraphs in the follow-up answer


def python_help_conversations() -> list[dict]:
    """Conversations made from the stdlib docstrings that ship with Python: a question about an object,
    its first paragraph as the answer, and where there is more, a follow-up answered by the rest."""
    conversations = []
    for document in python_docs_corpus():
        name, _, doc = document.partition("\n\n")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name) or not doc:  # help-topic pages have no object name
            continue
        pick = stable_unit_hash(name, 1)
        first, _, rest = doc.partition("\n\n")
        messages = [{"role": "system", "content": _SYSTEM}] if pick < 0.3 else []
        messages += [{"role": "user", "content": _QUESTIONS[int(pick * 97) % len(_QUESTIONS)].format(name)},
                     {"role": "assistant", "content": first}]
        if rest:
            kept = rest[:_REST_CHARS]
            kept = kept[:kept.rfind("\n\n")] if len(rest) > _REST_CHARS and "\n\n" in kept else kept
            messages += [{"role": "user", "content": _FOLLOW_UPS[int(pick * 89) % len(_FOLLOW_UPS)]},
                         {"role": "assistant", "content": kept}]
        conversations.append({"messages": messages, "tools": None})
    return conversations
