"""Qwen3.5-0.8B pretraining shape: bf16 compute, fp32 master weights, seq 4096."""

import ml_collections

from qwen_jax.parallel.rules import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""
    config.init_adapter = ""  # a PEFT LoRA adapter of init_from to start from (merged, or trained on with LoRA)
    config.model = ml_collections.ConfigDict(
        {"preset": "qwen3.5-0.8b", "dtype": "bfloat16", "param_dtype": "float32", "remat": "dots"})
    config.train = ml_collections.ConfigDict(
        {"steps": 10000, "batch_size": 8, "seq_len": 4096, "lr": 3e-4, "warmup_steps": 500})
    # What to train on: the built-in corpus and/or .jsonl / .array_record files of {"text": ...} and
    # .txt files, e.g. --config.data.text_sources="['/data/web.jsonl']" (bad records are skipped and counted),
    # streamed: read, tokenised and packed as the run goes, so a corpus may be bigger than memory.
    config.data = ml_collections.ConfigDict({"text_sources": ["python_docs"], "streaming": True})
    config.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3})
    config.mesh = ml_collections.ConfigDict(
        {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1, "context": 1})
    # Logical axis -> mesh axes (MaxText style); edit here to reshard without touching the model.
    config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
    config.wandb = ml_collections.ConfigDict({"mode": "offline", "project": "qwen-jax"})
    return config
