"""Small building blocks shared by the modules."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.model.quant import quantize_int8


class Int8Linear(nnx.Module):
    """A bias-free Linear whose kernel is stored int8 [in, out] with a float32 scale per output [out]: weight-only
    quantisation of a frozen base (model.weight_quant), half a bfloat16 kernel's bytes. Computes
    (x W_int8) * scale in the compute dtype: the kernel is converted per use, one layer's at a time under the
    layer scan, so only the stored copy stays int8."""

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, kernel_init, rngs: nnx.Rngs,
                 use_bias: bool = False):
        del use_bias, param_dtype  # always bias-free; the kernel is int8 whatever param_dtype says
        # A random init is quantised from the float one (the same random draw as nnx.Linear's), so a fresh
        # quantised model is the quantised fresh model; a real one loads its kernels and quantises them.
        kernel, scale = quantize_int8(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
        self.kernel = nnx.Param(kernel)
        self.kernel_scale = nnx.Param(scale)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in the compute dtype."""
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        return y * self.kernel_scale[...].astype(dtype)


class LoRAUpdate:
    """Mixed into a Linear class: adds a low-rank update, x W + scale (x A) B, A [in, r], B [r, out]
    (nnx.LoRAParam).

    A starts as PEFT's (Kaiming-uniform, U(+-1/sqrt(in))) and B at zero, so the layer starts as its base. A and
    B are float32 whatever param_dtype says: they are small, and they are what the optimizer steps, while a
    frozen base may well be bfloat16 (or int8).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float, rngs: nnx.Rngs, **kw):
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_scale = scale
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out] in the compute dtype."""
        dtype = self.dtype or x.dtype
        low = jnp.dot(x.astype(dtype), self.lora_a[...].astype(dtype))
        return super().__call__(x) + self.lora_scale * jnp.dot(low, self.lora_b[...].astype(dtype))


class LoRALinear(LoRAUpdate, nnx.Linear):
    """nnx.Linear + LoRAUpdate."""


class Int8LoRALinear(LoRAUpdate, Int8Linear):
    """Int8Linear + LoRAUpdate: QLoRA's layout, the adapters trained on an int8 base."""


def dense(in_features: int, out_features: int, *, dtype, param_dtype, init_std, rngs,
          lora: tuple[int, float] | None = None, quant: str = "") -> nnx.Module:
    """A bias-free Linear (kernel [in, out]) initialised N(0, init_std), as HF initialises Linear; with
    lora = (rank, scale), a LoRA one; with quant "int8" (ModelConfig.weight_quant), its kernel int8."""
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(init_std),
              rngs=rngs)
    base = Int8Linear if quant == "int8" else nnx.Linear
    if lora is None:
        return base(in_features, out_features, **kw)
    rank, scale = lora
    return (Int8LoRALinear if quant == "int8" else LoRALinear)(in_features, out_features, rank=rank, scale=scale,
                                                               **kw)
