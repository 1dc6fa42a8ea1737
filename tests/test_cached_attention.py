"""Attention over a cache by the block walk (decode steps and prefills) == one masked attention over the whole
cache; it reads no block past the written columns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.ops.cached_attention import cached_attention, cached_attention_mask

B, S, HQ, HKV, D = 3, 100, 4, 2, 16  # S is no multiple of the block: the last block starts early


def cache_and_queries(seed: int, length: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, length, HQ, D))
    k, v = (jax.random.normal(key, (3, B, S, HKV, D)) for key in keys[1:3])  # three stacked groups
    valid = jax.random.bernoulli(keys[3], 0.8, (B, S))
    return q, k, v, valid


@pytest.mark.parametrize("index, length", [(0, 1), (37, 1), (99, 1), (60, 3), (0, 40)])
def test_block_walk_equals_masked_attention_over_the_whole_cache(index, length):
    """Decode steps (the first column, one mid-block, the last) and prefills (one, and one over three blocks)."""
    q, k, v, valid = cache_and_queries(index, length)
    mask = cached_attention_mask(valid, jnp.int32(index), length)
    expected = jax.nn.dot_product_attention(q, k[1], v[1], mask=mask, scale=D**-0.5)
    walk = jax.jit(lambda q, k, v, valid, index: cached_attention(q, k, v, valid, index, scale=D**-0.5,
                                                                  group=jnp.int32(1), block=16))
    np.testing.assert_allclose(walk(q, k, v, valid, jnp.int32(index)), expected, rtol=1e-5, atol=1e-6)
    unstacked = cached_attention(q, k[1], v[1], valid, jnp.int32(index), scale=D**-0.5, block=16)
    np.testing.assert_allclose(unstacked, expected, rtol=1e-5, atol=1e-6)


def test_columns_past_the_written_ones_are_never_read():
    """NaN keys and values beyond the written columns (blocks the walk must not reach) leave the output finite
    and equal to attention over the written columns alone."""
    q, k, v, valid = cache_and_queries(1, 1)
    index, block = 40, 16  # written: columns 0..40, inside blocks 0..2 (0..47)
    poisoned = lambda x: x.at[:, :, 48:].set(jnp.nan)
    out = cached_attention(q, poisoned(k), poisoned(v), valid, jnp.int32(index), scale=D**-0.5, group=0,
                           block=block)
    mask = cached_attention_mask(valid, jnp.int32(index), 1)
    expected = jax.nn.dot_product_attention(q, k[0, :, :48], v[0, :, :48], mask=mask[..., :48], scale=D**-0.5)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_stays_close_to_float32():
    q, k, v, valid = cache_and_queries(2, 1)
    full = cached_attention(q, k, v, valid, jnp.int32(70), scale=D**-0.5, group=2, block=16)
    half = cached_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), valid, jnp.int32(70), scale=D**-0.5,
                            group=2, block=16)
    assert half.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(half.astype(jnp.float32) - full))) < 3e-2
