"""Small building blocks shared by the modules."""

import math

import jax
import jax.numpy as jnp
from flax import nnx


class LoRALinear(nnx.Linear):
    """A bias-free Linear plus a low-rank update: x W + scale (x A) B, A [in, r], B [r, out] (nnx.LoRAParam).

    A starts as PEFT's (Kaiming-uniform, U(+-1/sqrt(in))) and B at zero, so the layer starts as its base. A and
    B are float32 whatever param_dtype says: they are small, and they are what the optimizer steps, while a
    frozen base may well be bfloat16.
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


def dense(in_features: int, out_features: int, *, dtype, param_dtype, init_std, rngs,
          lora: tuple[int, float] | None = None) -> nnx.Linear:
    """A bias-free Linear (kernel [in, out]) initialised N(0, init_std), as HF initialises Linear; with
    lora = (rank, scale), a LoRALinear."""
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(init_std),
              rngs=rngs)
    if lora is None:
        return nnx.Linear(in_features, out_features, **kw)
    rank, scale = lora
    return LoRALinear(in_features, out_features, rank=rank, scale=scale, **kw)
