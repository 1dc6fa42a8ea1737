"""Dense SwiGLU feed-forward block."""

from collections.abc import Callable

import jax
from flax import nnx

from qwen_jax.model.layers import dense


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, init_std, rngs,
                 lora_for: Callable[[str], tuple | None] = lambda module: None, quant: str = ""):
        """lora_for(projection name) -> its LoRA (rank, scale) or None (ModelConfig.lora_for); quant:
        ModelConfig.weight_quant."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs, quant=quant)
        self.gate_proj = dense(hidden, intermediate, **kw, lora=lora_for("gate_proj"))
        self.up_proj = dense(hidden, intermediate, **kw, lora=lora_for("up_proj"))
        self.down_proj = dense(intermediate, hidden, **kw, lora=lora_for("down_proj"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, H] -> [B, T, H]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
