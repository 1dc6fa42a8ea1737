"""The tiny MoE model (8 experts, top-2, shared expert); experts spread over every device present."""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_tiny.py"))
    config.model.preset = "tiny-moe"
    # On one CPU this is a 1-device run; on 8 devices each holds one expert and a slice of the batch.
    config.mesh.data, config.mesh.expert = 1, -1
    return config
