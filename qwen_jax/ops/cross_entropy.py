"""Chunked cross-entropy over final hidden states: never holds [N, V] fp32 logits at once.

Qwen3.5's vocabulary is 248,320: full fp32 logits for one 4096-token row are 4 GB. Tokens are
processed in chunks under jax.checkpoint, so the backward pass recomputes each chunk's logits
instead of keeping them. Chunks take tokens strided, so tokens sharded over the mesh stay put.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array,
                          mask: jax.Array, *, chunk_size: int = 2048, z_loss_weight: float = 0.0,
                          compute_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, H], head_weight [H, V], targets [B, T], mask [B, T] -> (sum of masked CE, sum of z-loss).

    About chunk_size tokens per chunk. The z-loss term is z_loss_weight * logsumexp(logits)^2 per masked
    token (PaLM).
    """
    batch, length, _ = hidden.shape
    chunks = _chunk_count(batch, length, chunk_size)

    def strided(x):
        """[B, T, ...] -> [chunks, B, T / chunks, ...], chunk k holding positions k, k + chunks, ...

        Rows sharded over the batch axes and positions over `context` (contiguous blocks) then keep
        their share in every chunk, so the scan runs on each device's own tokens, gathering nothing.
        """
        return jnp.moveaxis(x.reshape(batch, length // chunks, chunks, *x.shape[2:]), 2, 0)

    hidden, targets, mask = strided(hidden), strided(targets), strided(mask.astype(jnp.float32))
    weight = head_weight.astype(compute_dtype)

    @jax.checkpoint
    def chunk_loss(h, t, m):
        logits = jnp.dot(h.astype(compute_dtype), weight, preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target_logit) * m), jnp.sum(z_loss_weight * log_z**2 * m)

    def body(totals, chunk):
        ce, z = chunk_loss(*chunk)
        return (totals[0] + ce, totals[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (hidden, targets, mask))
    return ce_sum, z_sum


def _chunk_count(batch: int, length: int, chunk_size: int) -> int:
    """The number of chunks: about batch * length / chunk_size, rounded to a divisor of length."""
    chunks = max(1, min(length, batch * length // chunk_size))
    while length % chunks:
        chunks -= 1
    return chunks
