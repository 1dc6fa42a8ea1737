"""A LoRA model's adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors), which
peft.PeftModel, and servers that hot-swap LoRA adapters, load onto the HF base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from qwen_jax.config import ConfigError
from qwen_jax.interop.hf import checkpoint_name, copy_tokenizer_files, tensor_map
from qwen_jax.model.lora import ADAPTER_LEAVES

PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def check_exportable(config) -> None:
    """Raise ConfigError unless PEFT's LoRA can say what this model adds to its base."""
    if not config.lora_rank:
        raise ConfigError("this model has no LoRA adapters (model.lora_rank = 0) to write as a PEFT adapter")
    if config.lora_also_train:
        raise ConfigError(f"this run also trained {list(config.lora_also_train)} whole, which a PEFT LoRA adapter "
                          "does not hold: export the merged model (--to-hf) instead")
    if config.architecture != "qwen3_5":
        raise ConfigError(f"PEFT adapters are written for Qwen3.5's projections; {config.architecture!r} fuses "
                          "them differently in HF: export the merged model (--to-hf) instead")


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT's tensor name -> float32 array: lora_A.weight [r, in] and lora_B.weight [out, r] per projection."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for name, (our_path, index, _) in tensor_map(model).items():
        module, leaf = name.rsplit(".", 1)
        if leaf in ADAPTER_LEAVES:
            array = flat[our_path] if index is None else flat[our_path][index]
            peft_name = f"base_model.model.{checkpoint_name(module, model.config)}.{PEFT_NAMES[leaf]}.weight"
            tensors[peft_name] = np.ascontiguousarray(np.asarray(array, np.float32).T)
    return tensors


def adapter_config(config, base_model: str = "") -> dict:
    """adapter_config.json: the rank, alpha and a target pattern that matches exactly the adapted projections
    of the decoder layers (PEFT full-matches a string against each module's name)."""
    targets = "|".join(sorted(config.lora_targets))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": rf"model(\.language_model)?\.layers\.\d+\..*\.({targets})",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None}


def save_peft(model, path: str | Path, base_model: str = "") -> None:
    """Write `model`'s LoRA adapters to DIR as a PEFT adapter (and its source's tokenizer files)."""
    check_exportable(model.config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model), path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(model.config, base_model), indent=2))
    copy_tokenizer_files(model, path)
