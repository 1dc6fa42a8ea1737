"""A checkpoint's Jinja chat template, rendered as transformers renders it, and the RL formats it implies.

The template comes from `chat_template.jinja` or `tokenizer_config.json` beside the tokenizer (HF's
layout). It renders in a sandbox, with the few extras HF templates use: `trim_blocks` and
`lstrip_blocks`, `{% break %}` / `{% continue %}`, `{% generation %}` blocks, a `tojson` that does
not escape HTML, `raise_exception`, `strftime_now`, `namespace`, and the special tokens
(`eos_token`, ...) as variables.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen_jax.config import ConfigError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Stands for the observation while a template renders: plain letters, so trims and splits leave it whole.
MARK = "QwenJaxObservationMark"


def find_chat_template(directory: str | Path) -> tuple[str, dict[str, str]] | None:
    """(template, special tokens by name) from an HF directory, or None where it has no template."""
    directory = Path(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: the default one
        template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
    if not isinstance(template, str):
        return None
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    return template, special


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %} ... {% endgeneration %}` (HF marks the assistant's tokens with it): its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """The template compiled once, in the sandbox with HF's extras."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, namespace=jinja2.utils.Namespace,
                               strftime_now=lambda form: datetime.datetime.now().strftime(form))
    return environment.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool,
                special_tokens: dict[str, str] | None = None, **kwargs) -> str:
    """The conversation as the template writes it; kwargs (e.g. enable_thinking, tools) go to the template."""
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      **variables)


def _as_format(text: str) -> str:
    """Rendered text holding MARK once -> a format string of {observation}."""
    if text.count(MARK) != 1:
        raise ConfigError(f"the chat template wrote the message {text.count(MARK)} times, not once")
    return text.replace("{", "{{").replace("}", "}}").replace(MARK, "{observation}")


def chat_formats(template: str, stop_text: str, special_tokens: dict[str, str] | None = None,
                 reply_role: str = "user", **kwargs) -> tuple[str, str]:
    """(prompt_format, reply_format) for RL: the task as the first user turn up to the generation
    prompt; and, after a reply that ended with `stop_text`, the environment's answer as a
    `reply_role` turn ("user", or "tool" for a tool's result) up to the next generation prompt."""
    render = dict(special_tokens=special_tokens, **kwargs)
    prompt = render_chat(template, [{"role": "user", "content": MARK}], add_generation_prompt=True, **render)
    reply = "QwenJaxReplyMark"
    both = render_chat(template, [{"role": "user", "content": "task"}, {"role": "assistant", "content": reply},
                                  {"role": reply_role, "content": MARK}], add_generation_prompt=True, **render)
    if both.count(reply) != 1:
        raise ConfigError("the chat template does not write an assistant reply as it is given")
    after = both[both.index(reply) + len(reply):]
    if not after.startswith(stop_text):
        raise ConfigError(f"the chat template ends an assistant turn with {after[:40]!r}, not with the "
                          f"stop token {stop_text!r} a reply ends with")
    return _as_format(prompt), _as_format(after[len(stop_text):])


def load_chat_template(where: Path, asked_by: str) -> tuple[str, dict[str, str]]:
    """(template, special tokens) of a .jinja file or an HF-style directory; a ConfigError naming
    `asked_by` (the option that wants it) where there is none."""
    where = Path(where)
    if where.suffix == ".jinja" and where.is_file():
        return where.read_text(encoding="utf-8"), {}
    found = find_chat_template(where) if where.is_dir() else None
    if found is None:
        raise ConfigError(f"{asked_by}: {where} holds no chat template (chat_template.jinja, or "
                          "chat_template in tokenizer_config.json)")
    return found


def user_turns(model_dir: str | Path, prompts: list[str], *, media: list[str] = (), **kwargs) -> list[str]:
    """Each prompt as the one user turn of the chat template beside a model's tokenizer, up to the
    generation prompt (what `qwen-jax generate --chat` encodes); `media` ("image" / "video" each) are
    parts of that kind before its text."""
    from qwen_jax.interop.init_from import tokenizer_dir

    template, special_tokens = load_chat_template(tokenizer_dir(model_dir), "--chat")

    def content(prompt):
        return [{"type": kind} for kind in media] + [{"type": "text", "text": prompt}] if media else prompt

    return [render_chat(template, [{"role": "user", "content": content(prompt)}], add_generation_prompt=True,
                        special_tokens=special_tokens, **kwargs) for prompt in prompts]
