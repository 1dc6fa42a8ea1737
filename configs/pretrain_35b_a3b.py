"""Qwen3.5-35B-A3B pretraining shape: 256 experts over the `expert` axis, FSDP over the rest."""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_0_8b.py"))
    config.model.preset = "qwen3.5-35b-a3b"
    config.mesh.expert, config.mesh.fsdp = 8, -1
    return config
