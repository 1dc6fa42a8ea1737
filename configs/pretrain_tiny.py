"""The `make demo` job: the tiny preset on one CPU."""

import ml_collections

from qwen_jax.parallel.rules import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""
    config.init_adapter = ""  # a PEFT LoRA adapter of init_from to start from (merged, or trained on with LoRA)
    config.model = ml_collections.ConfigDict({"preset": "tiny"})
    config.train = ml_collections.ConfigDict(
        {"steps": 200, "batch_size": 8, "seq_len": 256, "lr": 3e-3, "warmup_steps": 20,
         "eval_every": 50})
    # What to train on: the built-in corpus and/or .jsonl / .array_record files of {"text": ...} and
    # .txt files, e.g. --config.data.text_sources="['/data/web.jsonl']" (bad records are skipped and counted).
    config.data = ml_collections.ConfigDict({"text_sources": ["python_docs"]})
    config.checkpoint = ml_collections.ConfigDict({"every_steps": 100, "keep": 3})
    config.mesh = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, "context": 1})
    # Logical axis -> mesh axes (MaxText style); edit here to reshard without touching the model.
    config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
    config.wandb = ml_collections.ConfigDict({"mode": "offline", "project": "qwen-jax"})
    return config
