"""Attention over a decode cache (a prefill or a decode step), one key block at a time, up to the last
written column.

The cache holds max_length columns, but after the tokens at columns .. c only the first c + 1 hold
anything. One masked attention over the whole cache reads every column's keys and values every call:
at the 0.8B shape, batch 64 and max_length 4096, 3 GiB per decode step over the six attention layers,
more than the weights; and a prefill builds [B, H, T, max_length] scores. Here a while loop walks key
blocks only as far as the written columns reach, with an online softmax, so a call costs what the
tokens so far cost. Inference only: the loop's trip count is a traced value, which reverse-mode
autodiff cannot take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.ops.blockwise_attention import softmax_block, softmax_result, softmax_start

# Columns per step of the walk: a step reads whole blocks, so a small block wastes little of a short
# cache's block; a large one takes fewer steps through a long one.
BLOCK = 256


def cached_attention_mask(valid: jax.Array, index: jax.Array, length: int) -> jax.Array:
    """valid [B, S] (columns holding real tokens, the new ones included) -> bool [B, 1, T, S] for
    T queries at columns index .. index + T - 1: causal over valid keys, and always the query's own
    column, so a padding query still has one key (no all-masked softmax)."""
    columns = jnp.arange(valid.shape[1])
    query_columns = index + jnp.arange(length)
    causal = columns[None, :] <= query_columns[:, None]
    own = columns[None, :] == query_columns[:, None]
    return ((valid[:, None, :] & causal[None]) | own[None])[:, None]


def cached_attention(q, keys, values, valid, index, *, scale: float, group=None, block: int = BLOCK) -> jax.Array:
    """q [B, T, Hq, D] for the tokens at columns index .. index + T - 1; keys, values [B, S, Hkv, D], or
    stacked [G, B, S, Hkv, D] read at `group`; valid bool [B, S] -> [B, T, Hq, D] in q's dtype.

    Masked as `cached_attention_mask` says, which is never past column index + T - 1, so the walk stops
    there. Query head h reads key head h // (Hq / Hkv).
    """
    batch, length, query_heads, head_dim = q.shape
    kv_heads, keys_total = keys.shape[-2], valid.shape[1]
    group_size = query_heads // kv_heads
    block = min(block, keys_total)
    grouped = (q * scale).reshape(batch, length, kv_heads, group_size, head_dim)

    def read(x, start):
        """Columns start .. start + block - 1 of x [B, S, ...] or of group `group` of a stacked x."""
        if group is None:
            return jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
        zeros = (0,) * (x.ndim - 3)
        return jax.lax.dynamic_slice(x, (group, 0, start, *zeros), (1, batch, block, *x.shape[3:]))[0]

    def step(number, carry):
        first = number * block
        # The last block may start early (dynamic slices stay inside the array); the columns it
        # shares with the block before are masked out, not counted twice.
        start = jnp.minimum(first, keys_total - block)
        fresh = (start + jnp.arange(block)) >= first
        k_b, v_b = read(keys, start), read(values, start)
        valid_block = jax.lax.dynamic_slice_in_dim(valid, start, block, axis=1)
        allowed = cached_attention_mask(valid_block, index - start, length)[:, 0] & fresh  # [B, T, block]
        scores = jnp.einsum("bthgd,bshd->bthgs", grouped, k_b, preferred_element_type=jnp.float32)
        return softmax_block(carry, scores, allowed[:, :, None, None, :], v_b)

    if block == keys_total:  # one block holds the whole cache: no loop to walk
        carry = step(0, softmax_start(grouped))
    else:
        carry = jax.lax.fori_loop(0, (index + length + block - 1) // block, step, softmax_start(grouped))
    return softmax_result(carry).reshape(q.shape).astype(q.dtype)
