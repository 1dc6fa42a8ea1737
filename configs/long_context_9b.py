"""Qwen3.5-9B on one 262,144-token row per step, the sequence split over `context`.

Parameters and Adam moments are sharded over `context` too (FSDP over the same devices), so that a
64-chip slice holds 1/64 of the 9B's state per chip beside its 4K-token shard of the sequence.
"""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_0_8b.py"))
    config.model.preset = "qwen3.5-9b"
    config.model.remat = "full"
    config.train.seq_len, config.train.batch_size = 262144, 1
    config.mesh.fsdp, config.mesh.context = 1, -1
    config.logical_axis_rules = [["embed", ["fsdp", "context"]] if rule[0] == "embed" else rule
                                 for rule in config.logical_axis_rules]
    return config
