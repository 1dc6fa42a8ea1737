"""Chunked cross-entropy over final hidden states: never holds [N, V] fp32 logits at once.

Qwen3.5's vocabulary is 248,320: full fp32 logits for one 4096-token row are 4 GB. Tokens are
processed in chunks, and each chunk's gradient is formed right where its logits are: d(loss)/d(logits)
is softmax - onehot, known in the forward pass. So the backward pass only scales what the forward
kept (the hidden states' gradient, and the head's, summed over chunks in float32), rather than
recomputing every chunk's logits: three [N, H] x [H, V] matmuls instead of four. Chunks take tokens
strided, so tokens sharded over the mesh stay put.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array,
                          mask: jax.Array, *, chunk_size: int = 2048, z_loss_weight: float = 0.0,
                          compute_dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden [B, T, H], head_weight [H, V], targets [B, T], mask [B, T] -> (loss, CE, z-loss) sums.

    loss = CE + z-loss summed over masked tokens, and only it carries a gradient; CE and z-loss come
    without one, for metrics. About chunk_size tokens per chunk. The z-loss term is
    z_loss_weight * logsumexp(logits)^2 per masked token (PaLM).
    """
    batch, length, _ = hidden.shape
    chunks = _chunk_count(batch, length, chunk_size)

    def strided(x):
        """[B, T, ...] -> [chunks, B, T / chunks, ...], chunk k holding positions k, k + chunks, ...

        Rows sharded over the batch axes and positions over `context` (contiguous blocks) then keep
        their share in every chunk, so the scan runs on each device's own tokens, gathering nothing.
        """
        return jnp.moveaxis(x.reshape(batch, length // chunks, chunks, *x.shape[2:]), 2, 0)

    loss, (ce_sum, z_sum) = _strided_loss(
        strided(hidden), head_weight, strided(targets), strided(mask.astype(jnp.float32)),
        float(z_loss_weight), jnp.dtype(compute_dtype))
    return loss, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


def _chunk_count(batch: int, length: int, chunk_size: int) -> int:
    """The number of chunks: about batch * length / chunk_size, rounded to a divisor of length."""
    chunks = max(1, min(length, batch * length // chunk_size))
    while length % chunks:
        chunks -= 1
    return chunks


def _scan_chunks(hidden, head_weight, targets, mask, z_loss_weight, compute_dtype, with_grads: bool):
    """Strided chunks [K, B, T/K, ...] -> ((CE sum, z-loss sum), and with_grads: (d hidden [K, ...] in
    hidden's dtype, d head_weight float32) of their total)."""
    weight = head_weight.astype(compute_dtype)

    def body(carry, chunk):
        h, t, m = chunk
        logits = jnp.dot(h.astype(compute_dtype), weight, preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        sums = (carry[0] + jnp.sum((log_z - target_logit) * m), carry[1] + jnp.sum(z_loss_weight * log_z**2 * m))
        if not with_grads:
            return sums, None
        # d/d logits of (log_z - logit_t) m + w log_z^2 m: softmax (1 + 2 w log_z) m - onehot(t) m.
        scale = (1 + 2 * z_loss_weight * log_z) * m
        d_logits = jnp.exp(logits - log_z[..., None]) * scale[..., None]
        d_logits = d_logits - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32) * m[..., None]
        d_logits = d_logits.astype(compute_dtype)
        d_hidden = jnp.dot(d_logits, weight.T, preferred_element_type=jnp.float32).astype(h.dtype)
        d_weight = carry[2] + jnp.einsum("bth,btv->hv", h.astype(compute_dtype), d_logits,
                                         preferred_element_type=jnp.float32)
        return (*sums, d_weight), d_hidden

    zero = jnp.zeros((), jnp.float32)
    if not with_grads:
        return jax.lax.scan(body, (zero, zero), (hidden, targets, mask))[0], None
    d_weight0 = jnp.zeros(head_weight.shape, jnp.float32)
    (ce_sum, z_sum, d_weight), d_hidden = jax.lax.scan(body, (zero, zero, d_weight0), (hidden, targets, mask))
    return (ce_sum, z_sum), (d_hidden, d_weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _strided_loss(hidden, head_weight, targets, mask, z_loss_weight, compute_dtype):
    """-> (CE + z-loss sum, (CE sum, z-loss sum)); only the first output has a gradient (the caller
    stops the others')."""
    ce_sum, z_sum = _scan_chunks(hidden, head_weight, targets, mask, z_loss_weight, compute_dtype, False)[0]
    return ce_sum + z_sum, (ce_sum, z_sum)


def _strided_loss_forward(hidden, head_weight, targets, mask, z_loss_weight, compute_dtype):
    (ce_sum, z_sum), grads = _scan_chunks(hidden, head_weight, targets, mask, z_loss_weight, compute_dtype, True)
    return (ce_sum + z_sum, (ce_sum, z_sum)), (grads, jnp.zeros((), head_weight.dtype))


def _strided_loss_backward(z_loss_weight, compute_dtype, residuals, cotangents):
    (d_hidden, d_weight), weight_like = residuals
    d_loss = cotangents[0]  # the metrics' cotangents are zero: chunked_cross_entropy stops their gradient
    return ((d_loss * d_hidden).astype(d_hidden.dtype), (d_loss * d_weight).astype(weight_like.dtype), None, None)


_strided_loss.defvjp(_strided_loss_forward, _strided_loss_backward)


def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *, chunk_size: int = 2048,
                   compute_dtype=jnp.float32) -> jax.Array:
    """hidden [B, T, H], head_weight [H, V], targets [B, T] -> log p(target) [B, T] float32, without a
    gradient, chunked as the loss is (no [B, T, V] logits at once)."""
    batch, length, _ = hidden.shape
    chunks = _chunk_count(batch, length, chunk_size)
    weight = jax.lax.stop_gradient(head_weight).astype(compute_dtype)

    def strided(x):  # [B, T, ...] -> [chunks, B, T / chunks, ...], as chunked_cross_entropy's
        return jnp.moveaxis(x.reshape(batch, length // chunks, chunks, *x.shape[2:]), 2, 0)

    def chunk_logprobs(chunk):
        h, t = chunk
        logits = jnp.dot(h.astype(compute_dtype), weight, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    per_chunk = jax.lax.map(chunk_logprobs, (strided(jax.lax.stop_gradient(hidden)), strided(targets)))
    return jnp.moveaxis(per_chunk, 0, 2).reshape(batch, length)  # back to [B, T / chunks, chunks] order
