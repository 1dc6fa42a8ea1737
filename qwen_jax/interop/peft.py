"""LoRA adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors), which peft.PeftModel,
and servers that hot-swap LoRA adapters, load onto the HF base model: written from a LoRA model, and read
back onto a base (as a run's starting adapters, or merged into its kernels)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen_jax.config import LORA_MODULES, ConfigError, ModelConfig
from qwen_jax.interop.hf import canonical_name, checkpoint_name, copy_tokenizer_files, tensor_map
from qwen_jax.model.decoder import Qwen35ForCausalLM
from qwen_jax.model.lora import ADAPTER_LEAVES, join, merge_adapters, plain_model

PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
ADAPTER_CONFIG, ADAPTER_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT's saved names: base_model.model.<the HF module>.lora_A.weight (the adapter's own name dropped).
PEFT_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json fields that change what the adapter computes beyond x A B * scale, with their neutral value.
UNSUPPORTED = {"use_dora": (False, "DoRA's magnitude vectors"), "fan_in_fan_out": (False, "transposed weights"),
               "rank_pattern": ({}, "per-module ranks"), "alpha_pattern": ({}, "per-module alphas"),
               "modules_to_save": (None, "modules trained whole"), "bias": ("none", "trained biases"),
               "lora_bias": (False, "a bias on lora_B"), "trainable_token_indices": (None, "trained token rows")}


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
    save_file(adapter_tensors(model), path / ADAPTER_FILE, metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model.config, base_model), indent=2))
    copy_tokenizer_files(model, path)


def read_adapter_config(path: str | Path) -> dict:
    """DIR's adapter_config.json, checked to describe a LoRA adapter that this model's LoRA computes."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.exists() or not (Path(path) / ADAPTER_FILE).exists():
        raise ConfigError(f"{path}: not a PEFT adapter directory (it needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are read")
    for field, (neutral, what) in UNSUPPORTED.items():
        if config.get(field, neutral) not in (neutral, None, False, {}, "none"):
            raise ConfigError(f"{file}: {field}={config[field]!r} ({what}) is not supported; merge the adapter "
                              "with PEFT (merge_and_unload) and use the merged model instead")
    return config


def lora_scale(adapter: dict) -> float:
    """What the adapter multiplies x A B by: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r = adapter["r"]
    return adapter["lora_alpha"] / (math.sqrt(r) if adapter.get("use_rslora") else r)


def _adapted_modules(path: Path) -> dict[str, dict[str, str]]:
    """The adapter file's HF module name -> {"A" | "B": tensor name}; any other tensor raises ConfigError."""
    modules: dict[str, dict[str, str]] = {}
    with safe_open(path / ADAPTER_FILE, framework="numpy") as reader:
        for key in reader.keys():
            if not (match := PEFT_TENSOR.fullmatch(key)):
                raise ConfigError(f"{path / ADAPTER_FILE}: tensor {key!r} is not a LoRA A or B weight of a linear "
                                  "layer (embedding adapters, biases and modules trained whole are not read)")
            modules.setdefault(match["module"], {})[match["part"]] = key
    return modules


def adapter_model_config(path: str | Path, base: ModelConfig) -> ModelConfig:
    """`base` with the rank, alpha (the same scale) and targets (the projections it adapts) of DIR's adapter."""
    adapter = read_adapter_config(path)
    adapted = {module.rsplit(".", 1)[-1] for module in _adapted_modules(Path(path))}
    if adapted - set(LORA_MODULES) or not adapted:
        raise ConfigError(f"{path}: the adapter adapts {sorted(adapted)}; this model's LoRA can adapt {LORA_MODULES}")
    return base.replace(lora_rank=adapter["r"], lora_alpha=lora_scale(adapter) * adapter["r"],
                        lora_targets=tuple(name for name in LORA_MODULES if name in adapted), lora_also_train=())


def adapter_params(path: str | Path, config: ModelConfig) -> dict:
    """DIR's adapter as params of a LoRA model of `config`: the lora_a [.., in, r] / lora_b [.., r, out] leaves
    of the projections it adapts (float32; zero in a layer it leaves out). Its rank and scale must be config's."""
    path = Path(path)
    adapter = read_adapter_config(path)
    if config.architecture != "qwen3_5":
        raise ConfigError(f"{path}: PEFT adapters are read onto Qwen3.5's projections; {config.architecture!r} "
                          "fuses them differently in HF")
    if adapter["r"] != config.lora_rank or not math.isclose(lora_scale(adapter), config.lora_alpha / config.lora_rank):
        raise ConfigError(f"{path}: the adapter has r={adapter['r']}, scale {lora_scale(adapter):g}; the model has "
                          f"model.lora_rank={config.lora_rank}, scale {config.lora_alpha / config.lora_rank:g}: set "
                          f"model.lora_rank={adapter['r']} model.lora_alpha={lora_scale(adapter) * adapter['r']:g}")
    model = nnx.eval_shape(lambda: Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    names, shapes = tensor_map(model), traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    leaves: dict[tuple, np.ndarray] = {}
    with safe_open(path / ADAPTER_FILE, framework="flax") as reader:  # numpy has no bfloat16
        for module, parts in _adapted_modules(path).items():
            if set(parts) != {"A", "B"}:
                raise ConfigError(f"{path / ADAPTER_FILE}: {module} has lora_{''.join(parts)} alone")
            ours = canonical_name(module, vision=True)
            for part, leaf in (("A", "lora_a"), ("B", "lora_b")):
                if f"{ours}.{leaf}" not in names:
                    adapted = module.rsplit(".", 1)[-1]
                    why = (f"model.lora_targets {list(config.lora_targets)} does not name {adapted!r}"
                           if adapted not in config.lora_targets else "this model has no such projection")
                    raise ConfigError(f"{path / ADAPTER_FILE}: {parts[part]}: {why}")
                our_path, index, _ = names[f"{ours}.{leaf}"]
                want = shapes[our_path]
                value = np.asarray(reader.get_tensor(parts[part]), np.float32).T
                expected = want.shape if index is None else want.shape[1:]
                if value.shape != expected:
                    raise ConfigError(f"{path / ADAPTER_FILE}: {parts[part]} has shape {value.T.shape}; this model "
                                      f"expects {expected[::-1]}")
                if our_path not in leaves:
                    leaves[our_path] = np.zeros(want.shape, want.dtype)
                leaves[our_path][... if index is None else index] = value
    return traverse_util.unflatten_dict(leaves)


def merge_adapter(params: dict, path: str | Path, config: ModelConfig) -> dict:
    """A plain model's params (of `config`) with DIR's adapter merged into its kernels: W + scale A B."""
    adapted = adapter_model_config(path, config)
    merged = merge_adapters(join(params, adapter_params(path, adapted)), adapted.lora_alpha / adapted.lora_rank)
    return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), merged, params)


def with_adapter(model, path: str | Path):
    """A model with DIR's PEFT adapter merged into its kernels (the model PEFT's merge_and_unload gives)."""
    model = plain_model(model)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, merge_adapter(nnx.to_pure_dict(state), path, model.config))
    merged = nnx.merge(graphdef, state)
    if hasattr(model, "source_dir"):
        merged.source_dir = model.source_dir
    return merged
