"""The fused chunk-terms kernel (interpret mode on CPU, in the Triton and the Mosaic layouts) ==
ops.delta_rule.chunk_terms, values and gradients; and every GPU kernel lowers to Triton for CUDA (on this
CPU host). The TPU kernels' compile for v5p is in test_pallas_delta_rule.py.

Production tiling: dk = dv = 128, chunks of 64, one grid step per chunk (four along each row), packed
segments with a reused id and padding, raw q and k normalised in the kernel.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.ops.delta_rule import chunk_terms
from qwen_jax.ops.pallas.chunk_terms import fused_chunk_terms
from qwen_jax.ops.pallas.gated_delta_rule import pallas_gated_delta_rule

B, T, H, D, C = 2, 200, 2, 128, 64  # T = 200: three full chunks and a partial one


def make_inputs(seed, dtype=jnp.float32):
    """Raw q, k, v [B,T,H,D] in dtype; float32 g, beta [B,T,H]."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(x, dtype) for x in rng.standard_normal((3, B, T, H, D)))
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((B, T, H))), jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), jnp.float32)
    return q, k, v, g, beta


SEGMENTS = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [64, 70, 50, 16]), np.repeat([1, 2, 1], [90, 30, 80])]),
                       jnp.int32)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@functools.partial(jax.jit, static_argnames=("fused", "normalize", "with_segments", "platform"))
def terms_and_grads(inputs, cotangents, *, fused, normalize, with_segments, platform="gpu"):
    """The six terms, and the gradients of sum(terms * cotangents) wrt q, k, v, g, beta."""
    ids = SEGMENTS if with_segments else None
    if fused:
        terms = functools.partial(fused_chunk_terms, normalize=normalize, platform=platform, interpret=True)
    else:
        terms = functools.partial(chunk_terms, normalize_qk=normalize)

    def loss(*inputs):
        values = terms(*inputs, ids, C)
        return sum(jnp.sum(x.astype(jnp.float32) * c) for x, c in zip(values, cotangents)), values

    (_, values), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(*inputs)
    return values, grads


def fused_and_reference(inputs, reference_inputs, seed, platform="gpu", **options):
    """(values, grads) of the fused kernel on `inputs` and of chunk_terms on `reference_inputs`, both
    against one set of random cotangents."""
    shapes = jax.eval_shape(lambda: chunk_terms(*reference_inputs, SEGMENTS, C))
    rng = np.random.default_rng(seed)
    cotangents = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in shapes]
    return (terms_and_grads(inputs, cotangents, fused=True, platform=platform, **options),
            terms_and_grads(reference_inputs, cotangents, fused=False, **options))


@pytest.mark.parametrize("normalize, with_segments, platform",
                         [(True, True, "gpu"), (False, False, "gpu"), (True, True, "tpu")])
def test_fused_terms_match_chunk_terms_in_float32(normalize, with_segments, platform):
    inputs = make_inputs(0)
    if not normalize:  # the pure rule's inputs: unit k, q scaled
        q, k = inputs[0], inputs[1]
        inputs = (q / jnp.linalg.norm(q, axis=-1, keepdims=True) * D**-0.5,
                  k / jnp.linalg.norm(k, axis=-1, keepdims=True), *inputs[2:])
    (values, grads), (expected_values, expected_grads) = fused_and_reference(
        inputs, inputs, 1, platform, normalize=normalize, with_segments=with_segments)
    for name, value, expected in zip(expected_values._fields, values, expected_values):
        assert value.shape == expected.shape and value.dtype == jnp.float32, name
        assert relative_error(value, expected) < 1e-5, name
    for name, grad, expected in zip(("q", "k", "v", "g", "beta"), grads, expected_grads):
        assert relative_error(grad, expected) < 1e-5, name


def test_fused_terms_in_bf16_stay_within_bf16_error():
    """bf16 q, k, v: bf16 terms and q, k, v gradients, against the float32 op on the same (rounded) inputs."""
    inputs = make_inputs(2, jnp.bfloat16)
    (values, grads), (expected_values, expected_grads) = fused_and_reference(
        inputs, tuple(x.astype(jnp.float32) for x in inputs), 3, normalize=True, with_segments=True)
    for name, value, expected in zip(expected_values._fields, values, expected_values):
        assert value.dtype == (jnp.float32 if name == "state_decay" else jnp.bfloat16), name
        assert relative_error(value, expected) < 1e-2, name
    for name, grad, expected, x in zip(("q", "k", "v", "g", "beta"), grads, expected_grads, inputs):
        assert grad.dtype == x.dtype, name
        assert relative_error(grad, expected) < 1e-2, name


@pytest.mark.parametrize("fused_terms, kernels", [
    (True, {"gdr_chunk_terms", "gdr_chunk_terms_backward", "gdr_chunk_forward", "gdr_chunk_backward"}),
    (None, {"gdr_chunk_forward", "gdr_chunk_backward"}),  # the GPU default: XLA's terms, the recurrence kernels
])
def test_gpu_kernels_lower_to_triton_for_cuda(fused_terms, kernels):
    """The bf16 forward and backward of the whole rule lower for CUDA: each kernel becomes a Triton call
    (this checks the Pallas-to-Triton lowering of every op they use; compiling needs a GPU)."""
    shapes = [jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)] * 3 + \
             [jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((1, 256), jnp.int32)]

    def loss(q, k, v, g, beta, ids):
        o, final = pallas_gated_delta_rule(q, k, v, g, beta, segment_ids=ids, normalize_qk=True, platform="gpu",
                                           interpret=False, fused_terms=fused_terms)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

    lowered = jax.jit(jax.grad(loss, argnums=range(5))).trace(*shapes).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") == len(kernels)
    assert set(re.findall(r'name = "(gdr_\w+)"', text)) == kernels
