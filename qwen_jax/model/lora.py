"""LoRA adapters in a pure-dict params tree: split from and joined to the frozen base, merged into it.

The adapters are the lora_a / lora_b leaves of model/layers.LoRALinear (ModelConfig.lora_rank > 0); the
base is every other leaf. A LoRA run trains the adapters and the modules of ModelConfig.lora_also_train.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import ConfigError
from qwen_jax.model.decoder import Qwen35ForCausalLM
from qwen_jax.model.quant import dequantize

ADAPTER_LEAVES = ("lora_a", "lora_b")


def _partition(tree: dict, picked, inside: bool = False) -> tuple[dict, dict]:
    """A nested dict -> (the leaves picked(key) says no to, those it says yes to), each with the dicts leading
    to them; a leaf is picked when its own key or an enclosing dict's is."""
    rest, chosen = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            parts = _partition(value, picked, inside or picked(key))
        else:
            parts = ({}, value) if inside or picked(key) else (value, {})
        for part, into in zip(parts, (rest, chosen)):
            if not isinstance(part, dict) or part:
                into[key] = part
    return rest, chosen


def split_adapters(params: dict) -> tuple[dict, dict]:
    """params -> (base, adapters): the tree without its lora_a / lora_b leaves, and those leaves alone."""
    return _partition(params, lambda key: key in ADAPTER_LEAVES)


def split_trained(params: dict, also_train: tuple[str, ...]) -> tuple[dict, dict]:
    """params -> (frozen, trained): what a LoRA run trains is the adapters and every module named in
    also_train (ModelConfig.lora_also_train, e.g. "embed_tokens"), whole."""
    return _partition(params, lambda key: key in ADAPTER_LEAVES or str(key) in also_train)


def check_also_train(params: dict, also_train: tuple[str, ...]) -> None:
    """Raise ConfigError for a name in also_train that names no module of `params`."""
    def modules(tree):
        return {str(key) for key, value in tree.items() if isinstance(value, dict)} | {
            name for value in tree.values() if isinstance(value, dict) for name in modules(value)}

    known = {name for name in modules(params) if not name.isdigit()}
    if unknown := [name for name in also_train if name not in known]:
        raise ConfigError(f"model.lora_also_train names no module {unknown}; the model's modules: {sorted(known)}")


def join(base: dict, adapters: dict) -> dict:
    """The inverse of split_adapters and split_trained: one tree holding both, adapters' leaves winning (in base's
    keys: a checkpoint restored without a target names list items "0", where the model's own tree has 0)."""
    joined = dict(base)
    own_keys = {str(key): key for key in base}
    for key, value in adapters.items():
        key = own_keys.get(str(key), key)
        joined[key] = join(base.get(key, {}), value) if isinstance(value, dict) else value
    return joined


def merge_adapters(params: dict, scale: float) -> dict:
    """Every adapted kernel W [..., in, out] replaced by W + scale A B (computed in float32, stored in W's
    dtype) and the adapters dropped: the plain model the adapted one computes."""
    merged = {}
    for key, value in params.items():
        if not isinstance(value, dict):
            merged[key] = value
        elif "lora_a" in value:
            kernel = value["kernel"]
            update = jnp.matmul(value["lora_a"].astype(jnp.float32), value["lora_b"].astype(jnp.float32))
            rest = {k: v for k, v in value.items() if k not in ADAPTER_LEAVES}
            merged[key] = {**rest, "kernel": (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)}
        else:
            merged[key] = merge_adapters(value, scale)
    return merged


def plain_model(model):
    """A LoRA or int8 model -> the plain model (lora_rank 0, weight_quant "") it computes: int8 kernels
    dequantized to param_dtype, then the updates merged into the kernels; a plain model as it is."""
    config = model.config
    if not config.lora_rank and not config.weight_quant:
        return model
    params = dequantize(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config.param_dtype)
    if config.lora_rank:
        params = merge_adapters(params, config.lora_alpha / config.lora_rank)
    plain_config = config.replace(lora_rank=0, weight_quant="")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen35ForCausalLM(plain_config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    plain = nnx.merge(graphdef, state)
    if hasattr(model, "source_dir"):
        plain.source_dir = model.source_dir
    return plain
