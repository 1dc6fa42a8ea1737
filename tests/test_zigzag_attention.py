"""Gated attention across the context axis with a zig-zag query layout: every shard answers one
early and one late half of the sequence, so causal work (key blocks after the queries are skipped)
is the same on every shard; values and gradients equal dense attention on one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.config import preset
from qwen_jax.model.attention import (
    GatedAttention,
    segment_causal_mask,
    unzigzag_outputs,
    zigzag_destination,
    zigzag_queries,
)
from qwen_jax.parallel.context import AXIS
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding

B, T = 2, 256


@pytest.mark.parametrize("shards", [2, 3, 4, 8])
def test_every_shard_gets_an_early_and_a_late_half_and_equal_causal_work(shards):
    halves = {shard: sorted(c for c in range(2 * shards) if zigzag_destination(c, shards) == shard)
              for shard in range(shards)}
    assert halves == {i: [i, 2 * shards - 1 - i] for i in range(shards)}
    # Half c needs the key halves 0..c: c + 1 of them, so every shard computes 2 * shards + 1.
    assert {sum(c + 1 for c in chunks) for chunks in halves.values()} == {2 * shards + 1}


def test_zigzag_moves_the_halves_and_back():
    mesh = make_mesh({AXIS: 8})
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    def local(x):
        early, late = zigzag_queries((x,), 8)
        return jnp.stack([early[0], late[0]]), unzigzag_outputs((early[0], late[0]), 8)

    halves, back = jax.shard_map(local, mesh=mesh, in_specs=P(None, AXIS),
                                 out_specs=(P(None, None, AXIS), P(None, AXIS)))(positions)
    np.testing.assert_array_equal(back, positions)
    half = T // 16
    for shard in range(8):  # shard i holds halves i and 15 - i of the sequence
        early, late = halves[:, :, shard * half:(shard + 1) * half]
        np.testing.assert_array_equal(early, positions[:, shard * half:(shard + 1) * half])
        np.testing.assert_array_equal(late, positions[:, (15 - shard) * half:(16 - shard) * half])


@pytest.mark.parametrize("mesh_sizes", [{"context": 8}, {"data": 2, "context": 4}])
def test_attention_across_context_equals_dense_attention(mesh_sizes):
    config = preset("tiny", dtype="float32")
    layer = GatedAttention(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = jnp.asarray(rng.standard_normal((B, T, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, B, T, kv_heads, dim)))
    # Row 0: documents that end on and across shard and half edges, then padding; row 1: one.
    ids = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [64, 100, 70, 22]), np.ones(T)]), jnp.int32)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    groups = jnp.repeat(jnp.arange(kv_heads), heads // kv_heads)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k[:, :, groups], v[:, :, groups],
                                            mask=segment_causal_mask(ids), scale=dim**-0.5)

    mesh = make_mesh(mesh_sizes)

    def across(q, k, v):
        with activation_sharding(mesh, DEFAULT_RULES):
            return layer._across_context(q, k, v, ids, mesh)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * weights)

    expected, expected_grads = jax.value_and_grad(functools.partial(loss, dense), (0, 1, 2))(q, k, v)
    sharded = NamedSharding(mesh, P(None, AXIS))
    inputs = [jax.device_put(x, sharded) for x in (q, k, v)]
    out = jax.jit(across)(*inputs)
    assert out.sharding.spec[1] == AXIS
    np.testing.assert_allclose(out, dense(q, k, v), rtol=1e-5, atol=1e-5)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, across), (0, 1, 2)))(*inputs)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for grad, want in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
    # The queries move by collective-permutes of half shards, never gathered whole.
    hlo = jax.jit(across).lower(*inputs).compile().as_text()
    assert "collective-permute" in hlo
