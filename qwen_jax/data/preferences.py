"""Preference pairs for DPO (train/preference.py): a prompt with a chosen and a rejected completion.

Records are TRL's layout, in .jsonl / .array_record files: {"prompt": ..., "chosen": ..., "rejected": ...},
each a string (a user turn; an assistant turn for the completions) or a list of messages, with optional
"tools"; or only "chosen" and "rejected" as whole conversations sharing their opening (an implicit
prompt). Each side is rendered by the run's chat template like an SFT conversation, and its learned
tokens are those after the two sides' common prefix of token ids: the completion, minus an opening the
two share, whose log-probs would cancel in DPO's loss anyway. A pair goes to rows 2i and 2i + 1 of a
batch (chosen, rejected) as the same segment of both, first fit, so row pairs pack several pairs.
"""

from __future__ import annotations

import numpy as np

from qwen_jax.data.chat_stream import CHAT_FILE_SUFFIXES, ConversationRows
from qwen_jax.data.conversations import (TokenizeConversation, check_conversation, json_object,
                                         python_help_conversations)
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import stable_unit_hash
from qwen_jax.data.streaming import RecordIndex


def _messages(value, role: str, field: str) -> list:
    """A string (one `role` turn) or a list of messages -> messages; raise Skip naming `field` otherwise."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise Skip("bad_field", f"'{field}' is a {type(value).__name__}, not a string or a list of messages")


def check_preference(value: dict) -> dict:
    """A record's {"chosen": conversation, "rejected": conversation}, each {"messages", "tools"}; raise Skip."""
    missing = [field for field in ("chosen", "rejected") if field not in value]
    if missing:
        raise Skip("missing_field", f"no {missing} among {sorted(value)}")
    prompt = _messages(value.get("prompt", []), "user", "prompt")
    sides = {}
    for side in ("chosen", "rejected"):
        conversation = {"messages": prompt + _messages(value[side], "assistant", side), "tools": value.get("tools")}
        sides[side] = check_conversation(conversation)
    if sides["chosen"] == sides["rejected"]:
        raise Skip("same_completion", "the chosen and the rejected completions are the same")
    return sides


def parse_preference(record: bytes | str, where: str) -> dict:
    """A JSON record -> check_preference's pair, or raise Skip."""
    return check_preference(json_object(record))


def python_help_preferences() -> list[dict]:
    """The built-in `python_help` conversations' first exchange, with its answer chosen over the same words
    shuffled: prefer what reads as written. (Another object's answer would leak: held-out pairs would reject
    answers that training pairs choose.)"""
    pairs = []
    for conversation in python_help_conversations():
        messages = conversation["messages"]
        answer = next(index for index, message in enumerate(messages) if message["role"] == "assistant")
        words = messages[answer]["content"].split()
        order = np.random.default_rng(int(stable_unit_hash(messages[answer - 1]["content"], 3) * 2**32)).permutation(
            len(words))
        shuffled = " ".join(words[i] for i in order)
        if len(words) < 4 or shuffled == " ".join(words):
            continue
        question = messages[:answer]
        pairs.append({"chosen": {"messages": messages[:answer + 1], "tools": None},
                      "rejected": {"messages": question + [{"role": "assistant", "content": shuffled}], "tools": None}})
    return pairs


def preference_records(sources) -> RecordIndex:
    """The records of config.data.chat_sources for a preference run: "python_help", .jsonl / .array_record."""
    return RecordIndex("chat_sources", sources, {"python_help": (python_help_preferences, lambda pair, where: pair)},
                       lambda path: parse_preference, CHAT_FILE_SUFFIXES)


class TokenizePreference:
    """A pair -> (chosen ids, chosen learned, rejected ids, rejected learned), learned past the two sides'
    common prefix; raise Skip where it cannot be used."""

    def __init__(self, tokenize: TokenizeConversation):
        self._tokenize, self.seq_len = tokenize, tokenize.seq_len

    def __call__(self, pair: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        (chosen, chosen_learned), (rejected, rejected_learned) = (self._tokenize(pair[side])
                                                                  for side in ("chosen", "rejected"))
        shortest = min(len(chosen), len(rejected))
        differ = np.flatnonzero(chosen[:shortest] != rejected[:shortest])
        shared = differ[0] if len(differ) else shortest
        chosen_learned, rejected_learned = chosen_learned.copy(), rejected_learned.copy()
        chosen_learned[:shared] = rejected_learned[:shared] = False
        if not chosen_learned.any() or not rejected_learned.any():
            raise Skip("no_completion", "a side learns no token past the opening both share")
        return chosen, chosen_learned, rejected, rejected_learned

    def check(self) -> None:
        """The conversations' check (the template ends a turn with a special token)."""
        self._tokenize.check()


class PairRows:
    """Row pairs [2R, seq_len]: pair i's chosen side in row 2j and its rejected side in row 2j + 1, as the
    same segment of both, in the first row pair with room for both."""

    def __init__(self, rows: int, seq_len: int, pad: int):
        if rows % 2:
            raise ValueError(f"preference batches need an even number of rows per host, got {rows}")
        self._rows = ConversationRows(rows, seq_len, pad)

    @property
    def empty(self) -> bool:
        return self._rows.empty

    def add(self, chosen, chosen_learned, rejected, rejected_learned) -> bool:
        """Place one pair (each side at most seq_len tokens); False where no row pair has room for it."""
        for pair_row in range(len(self._rows.filled) // 2):
            rows = (2 * pair_row, 2 * pair_row + 1)
            if all(self._rows.room(row) >= len(ids) for row, ids in zip(rows, (chosen, rejected))):
                self._rows.place(rows[0], chosen, chosen_learned)
                self._rows.place(rows[1], rejected, rejected_learned)
                return True
        return False

    def batch(self):
        return self._rows.batch()
