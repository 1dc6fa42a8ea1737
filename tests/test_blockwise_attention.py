"""Blockwise (online-softmax) attention == dense masked attention: values and gradients, GQA, packing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.model.attention import segment_causal_mask
from qwen_jax.ops.blockwise_attention import blockwise_attention

B, T, HQ, HKV, D = 2, 100, 4, 2, 16


def dense(q, k, v, segments):
    """The reference: XLA's attention with the model's [B, 1, T, T] segment-causal mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(segments), scale=D**-0.5)


def blockwise(q, k, v, segments, block):
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return blockwise_attention(q, k, v, positions, positions, segments, segments, scale=D**-0.5, block=block)


@functools.partial(jax.jit, static_argnames="block")
def output_loss_and_grads(q, k, v, segments, weights, block=None):
    """Attention's output, a weighted sum of it and that sum's gradients for q, k, v (dense
    attention when block is None), compiled once per block size."""
    attend = dense if block is None else functools.partial(blockwise, block=block)

    def loss(q, k, v):
        out = attend(q, k, v, segments)
        return jnp.sum(out * weights), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, value, grads


def test_blockwise_matches_dense_attention():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, HQ, D)), jnp.float32)
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, B, T, HKV, D)))
    # Row 0: three documents and padding (id 0); row 1: one document.
    segments = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [30, 25, 35, 10]), np.ones(T)]), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((B, T, HQ, D)), jnp.float32)

    expected_out, expected, expected_grads = output_loss_and_grads(q, k, v, segments, weights)
    for block in (16, 64, 128):  # T = 100 is not a multiple of 16 or 64: padded key blocks
        out, value, grads = output_loss_and_grads(q, k, v, segments, weights, block=block)
        np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        for grad, want in zip(grads, expected_grads):
            np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
