"""Supervised fine-tuning of the tiny preset on conversations made from the stdlib docs (a question
about an object, its docstring as the answer, a follow-up): loss on the assistant's turns only.

From scratch by default; start from the `make demo` run with
`--config.init_from=runs/demo/checkpoints/200` (its tokenizer gains ChatML's two tokens)."""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_tiny.py"))
    config.train.seq_len = 512
    config.train.steps = 150
    # Conversations: built-in "python_help" and/or .jsonl / .array_record files of {"messages": [...]},
    # rendered by the built-in ChatML template ("init_from": the template of init_from's checkpoint).
    config.data = {"kind": "chat", "chat_sources": ["python_help"], "chat_template": ""}
    config.checkpoint.every_steps = 50
    return config
