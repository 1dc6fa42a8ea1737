"""One layer on a mesh against another implementation on one device: output and every gradient."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding


def out_and_grads(layer, call, x, mesh=None):
    """call(layer, x) -> out: (out, the gradients of sum(out^2) for every weight and x, whether the jitted
    step holds a shard_map), traced under activation_sharding(mesh) when a mesh is given."""
    graph, params = nnx.split(layer)

    def loss(params, x):
        out = call(nnx.merge(graph, params), x)
        return jnp.sum(out * out), out

    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh, DEFAULT_RULES):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, out), grads = step(params, x)
        in_shard_map = "shard_map" in str(step.trace(params, x).jaxpr)
    return out, jax.tree.leaves(grads), in_shard_map


def assert_same_layer(expected, got, min_grads: int):
    """Two out_and_grads results agree (1e-4 relative, 1e-5 absolute), with more than min_grads gradients."""
    (expected_out, expected_grads, _), (out, grads, _) = expected, got
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(expected_grads) > min_grads
    for grad, want in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
