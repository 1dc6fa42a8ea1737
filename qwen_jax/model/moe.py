"""Sparse MoE block (HF `Qwen3_5MoeSparseMoeBlock` / `Qwen3NextSparseMoeBlock`): top-k routed
SwiGLU experts plus a sigmoid-gated shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.model.layers import dense
from qwen_jax.model.mlp import SwiGLU
from qwen_jax.ops.grouped_matmul import expert_capacity, expert_ffn
from qwen_jax.parallel.expert import expert_parallel_ffn
from qwen_jax.parallel.rules import active_mesh


class Experts(nnx.Module):
    """E SwiGLU experts: gate_up_proj [E, H, 2I] (gate columns first), down_proj [E, I, H]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, param_dtype, init_std,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, 2 * intermediate),
                                           param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, intermediate, hidden), param_dtype))


class SparseMoE(nnx.Module):
    """Router (softmax, top-k, renormalised), routed experts, shared expert scaled by sigmoid(gate)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        self.config = cfg
        self.gate = dense(cfg.hidden_size, cfg.num_experts, **kw)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                               param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, **kw,
                                    lora_for=cfg.lora_for, quant=cfg.weight_quant)
        self.shared_expert_gate = dense(cfg.hidden_size, 1, **kw)

    def __call__(self, x: jax.Array, token_mask: jax.Array, replay: jax.Array | None = None):
        """x [B, T, H], token_mask [B, T] (False = padding), replay int32 [B, T, k] or None
        -> (y [B, T, H], stats: routing [B, T, k], counts [E], prob_sum [E])."""
        cfg = self.config
        batch, length, hidden = x.shape
        logits = self.gate(x)  # [B, T, E] in the activation dtype, as HF
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if replay is None:
            top_probs, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
        else:  # the given experts, weighted by this router's current probabilities
            experts = replay.astype(jnp.int32)
            top_probs = jnp.take_along_axis(probs, experts, axis=-1)
        if cfg.norm_topk_prob:
            top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
        weights = top_probs.astype(logits.dtype)

        per_assignment = self._routed(x.reshape(-1, hidden), experts.reshape(-1, experts.shape[-1]))
        routed = jnp.einsum("nk,nkh->nh", weights.reshape(batch * length, -1), per_assignment)
        shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        y = routed.reshape(batch, length, hidden).astype(x.dtype) + shared

        mask = token_mask.astype(jnp.float32)
        # A scatter-add, not a [B, T, k, E] one-hot: that would be GBs at 512 experts.
        counts = jnp.zeros(cfg.num_experts).at[experts].add(jnp.broadcast_to(mask[..., None], experts.shape))
        stats = {"routing": experts, "counts": counts,
                 "prob_sum": jnp.einsum("bte,bt->e", probs, mask)}
        return y, stats

    def _routed(self, tokens: jax.Array, experts: jax.Array) -> jax.Array:
        """tokens [N, H], experts [N, k] -> each assignment's expert output [N, k, H] (unweighted)."""
        cfg = self.config
        gate_up, down = self.experts.gate_up_proj[...], self.experts.down_proj[...]
        mesh = active_mesh()
        if mesh is not None and mesh.shape.get("expert", 1) > 1:
            return expert_parallel_ffn(tokens, experts, gate_up, down, mesh=mesh,
                                       dispatch=cfg.moe_dispatch,
                                       capacity_factor=cfg.moe_capacity_factor)
        n, k = experts.shape
        out = expert_ffn(tokens, jnp.arange(n * k) // k, experts.reshape(-1), gate_up, down,
                         dispatch=cfg.moe_dispatch,
                         capacity=expert_capacity(n * k, cfg.num_experts, cfg.moe_capacity_factor))
        return out.reshape(n, k, -1)


def load_balancing_loss(counts: jax.Array, prob_sum: jax.Array, rows: jax.Array) -> jax.Array:
    """HF's `load_balancing_loss_func`: counts, prob_sum [L, E] pooled over layers, rows = unmasked
    tokens per layer -> E * sum_e f_e P_e (k for perfectly even routing)."""
    num_layers, num_experts = counts.shape
    total = jnp.maximum(rows * num_layers, 1.0)
    return num_experts * jnp.sum((counts.sum(0) / total) * (prob_sum.sum(0) / total))
