"""Chunked cross-entropy == the plain full-logits loss: values and gradients (hidden and head), with a
mask, z-loss and several chunks; its backward recomputes no logits; bf16 heads sum their chunks in float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.ops.cross_entropy import chunked_cross_entropy

B, T, H, V = 2, 48, 16, 40


def inputs(dtype):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((B, T, H)), dtype)
    weight = jnp.asarray(rng.standard_normal((H, V)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.uniform(size=(B, T)) > 0.25, jnp.float32)
    return hidden, weight, targets, mask


def plain_loss(hidden, weight, targets, mask, z_loss_weight):
    """The definition, all logits at once in float64."""
    logits = jnp.asarray(hidden, jnp.float64) @ jnp.asarray(weight, jnp.float64)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce, z = jnp.sum((log_z - target_logit) * mask), jnp.sum(z_loss_weight * log_z**2 * mask)
    return ce + z, (ce, z)


def chunked(hidden, weight, targets, mask, z_loss_weight, chunk_size, compute_dtype):
    loss, ce, z = chunked_cross_entropy(hidden, weight, targets, mask, chunk_size=chunk_size,
                                        z_loss_weight=z_loss_weight, compute_dtype=compute_dtype)
    return loss, (ce, z)


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-2])
@pytest.mark.parametrize("chunk_size", [96, 16])  # one chunk; six
def test_values_and_gradients_equal_the_full_logits_loss(z_loss_weight, chunk_size):
    hidden, weight, targets, mask = inputs(jnp.float32)
    with jax.enable_x64():
        (want, want_parts), want_grads = jax.value_and_grad(plain_loss, argnums=(0, 1), has_aux=True)(
            hidden, weight, targets, mask, z_loss_weight)
    run = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True), static_argnums=(4, 5, 6))
    (loss, parts), grads = run(hidden, weight, targets, mask, z_loss_weight, chunk_size, jnp.float32)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(parts, want_parts, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_metrics_carry_no_gradient_and_the_backward_recomputes_no_logits():
    hidden, weight, targets, mask = inputs(jnp.float32)
    grads = jax.grad(lambda h, w: chunked(h, w, targets, mask, 1e-2, 16, jnp.float32)[1][0], argnums=(0, 1))(
        hidden, weight)
    assert all(not np.any(g) for g in grads)  # CE for metrics only: the loss is what trains
    loss = functools.partial(chunked, targets=targets, mask=mask, z_loss_weight=0.0, chunk_size=16,
                             compute_dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: loss(h, w)[0], argnums=(0, 1)))(hidden, weight)
    # Forward: per chunk one [.., H] x [H, V] for the logits and two for the gradients; nothing after.
    dots = str(jaxpr).count("dot_general")
    assert dots == 3, jaxpr


def test_bf16_head_gradient_sums_its_chunks_in_float32():
    """24 chunks in bf16 (hidden, head and logits' gradient as matmul operands). Measured against the float64
    gradient of the same rounded inputs: 1.2e-3 whatever the chunk count; summing the chunks' partial head
    gradients in bf16, as autodiff of the scan did, gave 1.6e-3 with one chunk and 6.2e-3 with 24."""
    hidden, weight, targets, mask = inputs(jnp.bfloat16)
    weight = weight.astype(jnp.bfloat16).astype(jnp.float32)
    with jax.enable_x64():
        _, (_, want) = jax.value_and_grad(plain_loss, argnums=(0, 1), has_aux=True)(hidden, weight, targets, mask, 0.0)
    grad = jax.jit(jax.grad(lambda h, w: chunked(h, w, targets, mask, 0.0, 4, jnp.bfloat16)[0], argnums=1))(
        hidden, weight)
    assert grad.dtype == jnp.float32
    error = np.linalg.norm(np.asarray(grad, np.float64) - np.asarray(want, np.float64)) / np.linalg.norm(want)
    assert error < 3e-3, error
