"""Supervised fine-tuning of the early-fusion model (configs/pretrain_mm_tiny.py: the tiny model with
its tiny vision tower) on conversations with images: "Which digit is this?" about scikit-learn's
handwritten digits, among the stdlib-docs conversations; loss on the assistant's turns only (never
on image tokens).

From scratch by default; start from the early-fusion run with
`--config.init_from=runs/mm/checkpoints/100` (experiments/sft_vl_tiny/)."""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_mm_tiny.py"))
    config.train.seq_len = 512
    config.train.steps = 150
    # Conversation files hold messages whose content may list {"type": "image", "image": "cat.png"}
    # and {"type": "video", "video": "clip.mp4"} parts; every data field can be overridden.
    config.data.kind = "chat"
    config.data.chat_sources = ["digits_chat", "python_help"]
    config.checkpoint.every_steps = 50
    return config
