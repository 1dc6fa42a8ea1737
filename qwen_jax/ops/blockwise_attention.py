"""Causal, segment-masked attention one key block at a time (online softmax): never a [T, S] score matrix.

For long sequences split over devices: a shard's queries against the whole sequence's keys would be
[t, S] scores per head, 32 GB at t = 4K, S = 256K, 8 heads in float32. Here scores live one block of
keys at a time, and the backward pass recomputes each block (the scan body is rematerialised), so
memory grows with t x block, not t x S. A key block wholly after every query is skipped (a
`lax.cond`, forward and backward), so causal attention costs about half the dense work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEGATIVE = -1e30  # a finite "minus infinity": exp(NEGATIVE - m) is 0 and never NaN


def softmax_start(grouped_q: jax.Array) -> tuple:
    """The online softmax's carry for queries [..., D]: (out float32 [..., D], running max, running sum [...]).
    *_like(grouped_q): inside shard_map the carry then varies over the same mesh axes as the queries."""
    return (jnp.zeros_like(grouped_q, jnp.float32), jnp.full_like(grouped_q[..., 0], NEGATIVE, jnp.float32),
            jnp.zeros_like(grouped_q[..., 0], jnp.float32))


def softmax_block(carry: tuple, scores: jax.Array, allowed: jax.Array, values: jax.Array) -> tuple:
    """One key block into the online softmax: scores float32 [B, t, h, g, s], allowed bool (broadcast to
    them), values [B, s, h, D] -> the carry with the block's weights and values added."""
    out, running_max, running_sum = carry
    scores = jnp.where(allowed, scores, NEGATIVE)
    new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
    weights = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
    correction = jnp.exp(running_max - new_max)
    update = jnp.einsum("bthgs,bshd->bthgd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out * correction[..., None] + update, new_max, running_sum * correction + jnp.sum(weights, axis=-1)


def softmax_result(carry: tuple) -> jax.Array:
    """The carry after the last block -> attention out [..., D], float32. Every query must have seen a key."""
    out, _, total = carry
    return out / total[..., None]


def blockwise_attention(q, k, v, q_positions, k_positions, q_segments, k_segments, *, scale: float,
                        block: int = 1024) -> jax.Array:
    """q [B,t,Hq,D], k, v [B,S,Hkv,D], positions and segment ids [B,t] / [B,S] -> [B,t,Hq,D] in q's dtype.

    Query i sees key j iff position_j <= position_i and both are in one segment; Hq is a multiple of
    Hkv (grouped queries share a key head, head h reading key head h // (Hq / Hkv)). Key blocks
    past the last query position are not computed.
    """
    batch, length, query_heads, head_dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = query_heads // kv_heads
    block = min(block, keys)
    padding = -keys % block
    # Padded keys get segment -1, which no query has, and the last position, so they never force
    # a block to be computed.
    k, v = (jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) for x in (k, v))
    k_positions = jnp.pad(k_positions, ((0, 0), (0, padding)), mode="edge")
    k_segments = jnp.pad(k_segments, ((0, 0), (0, padding)), constant_values=-1)

    def blocks(x):
        """[B, S, ...] -> [S / block, B, block, ...]: the scan's leading axis."""
        return jnp.moveaxis(x.reshape(batch, -1, block, *x.shape[2:]), 1, 0)

    grouped_q = (q.astype(jnp.float32) * scale).reshape(batch, length, kv_heads, group, head_dim)
    last_query = jnp.max(q_positions)

    def attend_block(carry, key_block):
        k_b, v_b, k_pos, k_seg = key_block
        scores = jnp.einsum("bthgd,bshd->bthgs", grouped_q, k_b.astype(jnp.float32))
        allowed = (q_positions[:, :, None] >= k_pos[:, None, :]) & (q_segments[:, :, None] == k_seg[:, None, :])
        return softmax_block(carry, scores, allowed[:, :, None, None, :], v_b.astype(jnp.float32))

    @jax.checkpoint
    def attend(carry, key_block):
        future = jnp.min(key_block[2]) > last_query  # no query sees any key of this block
        return jax.lax.cond(future, lambda carry, _: carry, attend_block, carry, key_block), None

    carry, _ = jax.lax.scan(attend, softmax_start(grouped_q), tuple(map(blocks, (k, v, k_positions, k_segments))))
    # Every query sees at least itself, so total > 0.
    return softmax_result(carry).reshape(q.shape).astype(q.dtype)
