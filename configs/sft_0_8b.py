"""Supervised fine-tuning of Qwen3.5-0.8B on chat data with its own chat template: loss on the
assistant's turns (their reasoning and tool calls included) and the <|im_end|> ending each.

Point init_from at the HF checkpoint and the sources at your conversations, e.g.
`--config.init_from=/ckpt/Qwen3.5-0.8B --config.data.chat_sources="['/data/chats.jsonl']"`."""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_0_8b.py"))
    config.init_from = "/ckpt/Qwen3.5-0.8B"
    config.train.update({"steps": 2000, "lr": 1e-5, "warmup_steps": 100})
    config.data = {"kind": "chat", "chat_sources": ["python_help"], "chat_template": "init_from",
                   "chat_template_kwargs": {"enable_thinking": False}}
    config.checkpoint.every_steps = 500
    return config
