"""Parameter counts from the shapes of the real model classes (nothing is allocated)."""

import jax
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.model.decoder import Qwen35ForCausalLM


def _count(config: ModelConfig, kind) -> int:
    """The parameters of variable type `kind` (nnx.Param, nnx.LoRAParam) in the model of `config`."""
    model = nnx.eval_shape(lambda: Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token): active leaves out the experts a token is not routed to."""
    total = _count(config, nnx.Param)
    if not config.is_moe:
        return total, total
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    unused = config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    return total, total - unused


def adapter_count(config: ModelConfig) -> int:
    """The LoRA adapters' parameters (0 without LoRA)."""
    return _count(config, nnx.LoRAParam)
