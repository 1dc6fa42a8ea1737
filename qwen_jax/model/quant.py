"""Weight-only int8 quantisation (ModelConfig.weight_quant) in a pure-dict params tree: an int8 kernel is the
"kernel" beside a "kernel_scale" of layers.Int8Linear; kernel ~ int8 * scale per output channel."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def quantize_int8(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """kernel [..., in, out] -> (int8 [..., in, out], float32 scale [..., out]): symmetric, per output channel,
    each weight within scale / 2 of its own."""
    kernel = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=-2) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column stays zero
    return jnp.clip(jnp.round(kernel / scale[..., None, :]), -127, 127).astype(jnp.int8), scale


def float_targets(abstract: dict, dtype) -> dict:
    """An (abstract) int8 model's params -> those of its float model: each int8 kernel as a `dtype` one, no
    scales (what a checkpoint or HF directory holds, and quantize_like quantises)."""
    plain = {}
    for key, value in abstract.items():
        if isinstance(value, dict) and "kernel_scale" in value:
            kernel = value["kernel"]
            plain[key] = {**{k: v for k, v in value.items() if k != "kernel_scale"},
                          "kernel": jax.ShapeDtypeStruct(kernel.shape, jnp.dtype(dtype),
                                                         sharding=getattr(kernel, "sharding", None))}
        else:
            plain[key] = float_targets(value, dtype) if isinstance(value, dict) else value
    return plain


def quantize_like(params: dict, abstract: dict) -> dict:
    """Float params -> those of the int8 model `abstract` describes: each kernel it holds as int8 quantised
    (quantize_int8), with its scale; placed as `abstract`'s shardings where it has them. Takes `params`' leaves
    out of it as it goes, so that each float kernel can be freed once quantised."""
    quantized = {}
    for key, target in abstract.items():
        if key not in params:  # a part the source does not hold (load_init_params checks what it does)
            continue
        value = params.pop(key)
        if isinstance(target, dict) and "kernel_scale" in target:
            kernel, scale = quantize_int8(value["kernel"])
            value = {**value, "kernel": kernel, "kernel_scale": scale}
            value = {k: _place(v, target[k]) for k, v in value.items()}
        elif isinstance(target, dict):
            value = quantize_like(value, target)
        quantized[key] = value
    return quantized


def dequantize(params: dict, dtype) -> dict:
    """Every int8 kernel replaced by kernel * scale in `dtype`, its scale dropped: the float model's params."""
    plain = {}
    for key, value in params.items():
        if isinstance(value, dict) and "kernel_scale" in value:
            kernel = value["kernel"].astype(jnp.float32) * value["kernel_scale"][..., None, :]
            plain[key] = {**{k: v for k, v in value.items() if k != "kernel_scale"}, "kernel": kernel.astype(dtype)}
        else:
            plain[key] = dequantize(value, dtype) if isinstance(value, dict) else value
    return plain


def _place(x, target):
    sharding = getattr(target, "sharding", None)
    return x if sharding is None else jax.device_put(x, sharding)
