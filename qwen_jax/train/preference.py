"""Direct preference optimisation (DPO, Rafailov et al. 2023) on packed pairs of rows.

Rows 2i and 2i + 1 of a batch hold a pair's chosen and rejected completions (data/preferences.py),
each pair as segment s of both rows, so a row pair packs several pairs. With per-token log-probs lp
of the policy and ref of the frozen reference (the run's init_from), summed over each completion's
learned tokens (IPO: averaged), a pair's margin is
    h = (lp_chosen - ref_chosen) - (lp_rejected - ref_rejected),   loss = mean over pairs of L(h),
with L one of DPO_LOSS_FNS (train.dpo_loss; DPO's: softplus(-beta h)). The log-probs come chunked
(ops.cross_entropy.token_logprobs), never as [B, T, V] logits. The gradient is that of sum_t w_t CE_t
through the chunked cross-entropy, with w_t = -dloss/dlp_t fixed from the forward's h: -L'(h) / pairs on
a chosen token, the negative on a rejected one (divided by the completion's length where h averages).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import TrainConfig
from qwen_jax.ops.cross_entropy import chunked_cross_entropy, token_logprobs
from qwen_jax.train.step import model_inputs  # step imports this module only inside make_trainer


def completion_sums(values: jax.Array, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """values, mask, segment ids [B, T] -> [B, T]: entry [b, s] sums values * mask over row b's segment s."""
    batch, length = values.shape
    slots = (jnp.arange(batch)[:, None] * length + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum((values * mask).reshape(-1), slots, num_segments=batch * length)
    return sums.reshape(batch, length)


def pair_count(batch: dict) -> jax.Array:
    """The number of pairs in a batch: segments whose chosen and rejected rows both have learned tokens."""
    counts = completion_sums(jnp.ones_like(batch["loss_mask"]), batch["loss_mask"], batch["segment_ids"])
    return jnp.sum((counts[0::2] > 0) & (counts[1::2] > 0)).astype(jnp.float32)


# L(h, beta, label smoothing) per pair: the losses config.DPO_LOSSES names.
DPO_LOSS_FNS = {
    "sigmoid": lambda h, beta, eps: (1 - eps) * jax.nn.softplus(-beta * h) + eps * jax.nn.softplus(beta * h),
    "ipo": lambda h, beta, eps: (h - 1 / (2 * beta)) ** 2,
    "hinge": lambda h, beta, eps: jax.nn.relu(1 - beta * h),
}


def dpo_terms(policy: jax.Array, reference: jax.Array, mask: jax.Array, segment_ids: jax.Array,
              average: bool = False):
    """Per-token log-probs [B, T] of both models -> (h [B/2, T]: per pair slot, the chosen completion's
    log-ratio minus the rejected one's; valid [B/2, T]; each completion's log-ratio [B, T]: the sum of
    lp - ref over its learned tokens, or with `average` their mean; its learned tokens [B, T])."""
    sums = completion_sums(policy - reference, mask, segment_ids)
    counts = completion_sums(jnp.ones_like(mask), mask, segment_ids)
    valid = (counts[0::2] > 0) & (counts[1::2] > 0)
    ratios = sums / jnp.maximum(counts, 1.0) if average else sums
    return jnp.where(valid, ratios[0::2] - ratios[1::2], 0.0), valid, ratios, counts


def dpo_loss_fn(params, graphdef, batch: dict, cfg: TrainConfig, pairs: jax.Array):
    """The DPO loss of one micro-batch, its sums normalised by the global pair count; the value is the true
    loss, the gradient that of the weighted cross-entropy (module docstring)."""
    model, out, policy = _forward(params, graphdef, batch, cfg.ce_chunk)
    head, dtype = model.head_weight(), out.hidden.dtype
    targets, mask, segments = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    average = cfg.dpo_loss == "ipo"
    h, valid, ratios, counts = dpo_terms(policy, batch["ref_logprobs"], mask, segments, average)
    loss_of = lambda h: DPO_LOSS_FNS[cfg.dpo_loss](h, cfg.dpo_beta, cfg.dpo_label_smoothing)  # noqa: E731
    loss = jnp.sum(jnp.where(valid, loss_of(h), 0.0)) / pairs
    # -dloss/dlp per pair slot, spread back to the tokens of its two rows (chosen +, rejected -).
    slot_weight = jnp.where(valid, -jax.grad(lambda h: jnp.sum(loss_of(h)))(h), 0.0) / pairs
    rows = jnp.stack([slot_weight, -slot_weight], axis=1).reshape(mask.shape)  # [B, T]: row b's segment s
    if average:
        rows = rows / jnp.maximum(counts, 1.0)
    token_weight = jnp.take_along_axis(rows, segments, axis=1) * mask
    surrogate, _, _ = chunked_cross_entropy(out.hidden, head, targets, jax.lax.stop_gradient(token_weight),
                                            chunk_size=cfg.ce_chunk, compute_dtype=dtype)
    aux = out.aux_loss / cfg.grad_accum
    aux_weight = model.config.router_aux_loss_coef if cfg.moe_aux_loss is None else cfg.moe_aux_loss
    total = surrogate - jax.lax.stop_gradient(surrogate) + loss + aux_weight * aux
    load = jnp.zeros((0,)) if out.expert_load is None else out.expert_load
    per_pair = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / pairs  # noqa: E731
    return total, {"ce": loss, "aux": aux, "expert_load": load, "dpo/accuracy": per_pair(h > 0),
                   "dpo/reward_margin": per_pair(cfg.dpo_beta * h),
                   "dpo/chosen_reward": per_pair(cfg.dpo_beta * ratios[0::2]),
                   "dpo/rejected_reward": per_pair(cfg.dpo_beta * ratios[1::2])}


def _forward(params, graphdef, batch: dict, ce_chunk: int):
    """-> (model, its output, the log-probs of the batch's targets [B, T] float32, without a gradient)."""
    model = nnx.merge(graphdef, params)
    out = model(batch["input_ids"], **model_inputs(batch))
    logprobs = token_logprobs(out.hidden, model.head_weight(), batch["targets"], chunk_size=ce_chunk,
                              compute_dtype=out.hidden.dtype)
    return model, out, logprobs


def reference_logprobs(params, graphdef, batch: dict, ce_chunk: int) -> jax.Array:
    """The frozen reference model's per-token log-probs of a batch's targets [B, T] float32."""
    return _forward(params, graphdef, batch, ce_chunk)[2]
