"""Splash attention (JAX's TPU kernels, run here in the Pallas interpreter) == XLA's masked attention: values
and gradients at the production block size with packed rows, the attention layer on a 2 x 2 mesh in
shard_map, and how "auto" / "splash" resolve on a TPU target."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layer_parity import assert_same_layer, out_and_grads

from qwen_jax import preset
from qwen_jax.config import ConfigError
from qwen_jax.model import attention
from qwen_jax.model.attention import GatedAttention, resolve_attention_impl, segment_causal_mask
from qwen_jax.model.rope import rope_cos_sin
from qwen_jax.ops.pallas.splash_attention import splash_attention, splash_supports
from qwen_jax.parallel.mesh import make_mesh

# The attention layer's shape with splash's smallest block: head_dim must fill 128-lane tiles.
CONFIG = preset("tiny", head_dim=128, mrope_section=(8, 4, 4), attention_impl="splash", splash_block=128)


def packed_ids(length: int) -> jax.Array:
    """Two rows: three documents whose boundaries miss the block edges, then padding (id 0); one document."""
    first = np.repeat([1, 2, 3], [length // 3, length // 2, length // 8])
    first = np.pad(first, (0, length - first.size))
    return jnp.asarray(np.stack([first, np.ones(length, int)]), jnp.int32)


def xla_attention(q, k, v, ids):
    mask = None if ids is None else segment_causal_mask(ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=ids is None, scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("with_segments", [True, False])
def test_splash_equals_xla_attention_at_the_production_block(with_segments):
    """Qwen3.5's head_dim 256 and grouped queries (4 over 2 key heads), T = 1024 in two 512 blocks: outputs and
    the gradients of q, k and v within float32 rounding of XLA's attention."""
    keys = jax.random.split(jax.random.key(0), 4)
    batch, length, dim = 2, 1024, 256
    q = jax.random.normal(keys[0], (batch, length, 4, dim))
    k, v = (jax.random.normal(key, (batch, length, 2, dim)) for key in keys[1:3])
    weights = jax.random.normal(keys[3], q.shape)
    ids = packed_ids(length) if with_segments else None

    def loss_of(attend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, ids) * weights), argnums=(0, 1, 2)))

    splash = functools.partial(splash_attention, scale=dim**-0.5, block=512, interpret=True)
    (expected, expected_grads), (actual, grads) = loss_of(xla_attention)(q, k, v), loss_of(splash)(q, k, v)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        scale = float(jnp.max(jnp.abs(reference)))
        assert float(jnp.max(jnp.abs(grad - reference))) < 1e-5 * scale


def test_splash_rejects_what_a_tpu_cannot_tile():
    assert splash_supports(4096, 256, 512) is None
    assert splash_supports(256, 128, 512) is None  # a short sequence is one block
    assert "not a multiple of the splash block 512" in splash_supports(1000, 256, 512)
    assert "head_dim 64" in splash_supports(1024, 64, 512)
    x = jnp.zeros((1, 640, 2, 128))
    with pytest.raises(ValueError, match="sequence length 640"):
        splash_attention(x, x, x, None, scale=1.0, block=512, interpret=True)


def test_auto_takes_splash_on_a_tpu_target_and_xla_where_it_cannot(monkeypatch):
    assert resolve_attention_impl("auto", jnp.bfloat16, "tpu") == "splash"
    assert resolve_attention_impl("auto", jnp.float32, "tpu") == "splash"
    assert resolve_attention_impl("auto", jnp.bfloat16, "cpu") == "xla"
    assert resolve_attention_impl("splash", jnp.float32, "cpu") == "splash"  # the interpreter
    monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
    layer = GatedAttention(CONFIG.replace(attention_impl="auto"), dtype=jnp.float32, param_dtype=jnp.float32,
                           rngs=nnx.Rngs(0))
    assert layer._implementation(jnp.float32, 256) == "splash"
    assert layer._implementation(jnp.float32, 200) == "xla"  # 200 is no block multiple
    layer.attention_impl = "splash"
    with pytest.raises(ConfigError, match="model.attention_impl 'splash'.*sequence length 200"):
        layer._implementation(jnp.float32, 200)


def test_splash_block_must_fill_lane_tiles():
    with pytest.raises(ConfigError, match="model.splash_block"):
        CONFIG.replace(splash_block=100)


@pytest.mark.parametrize("with_segments", [True, False])
def test_splash_layer_on_a_mesh_matches_the_xla_layer(with_segments):
    """The attention layer on 4 devices (data 2 x tensor 2) with splash in shard_map over rows and heads ==
    the XLA layer on one device: output and the gradients of the input and every weight; packed rows, or
    plain causal ones."""
    length = 256  # two 128 blocks
    ids = packed_ids(length) if with_segments else None
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, length, CONFIG.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    cos, sin = rope_cos_sin(positions, rotary_dim=CONFIG.rotary_dim, theta=CONFIG.rope_theta,
                            mrope_section=CONFIG.mrope_section, dtype=jnp.float32)
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])

    def run(impl, on_mesh):
        layer = GatedAttention(CONFIG.replace(attention_impl=impl), dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=nnx.Rngs(0))
        mask = None if impl == "splash" or ids is None else segment_causal_mask(ids)
        return out_and_grads(layer, lambda layer, x: layer(x, cos, sin, mask, segment_ids=ids)[0], x,
                             mesh if on_mesh else None)

    on_mesh = run("splash", on_mesh=True)
    assert on_mesh[2]  # the kernels ran in shard_map
    assert_same_layer(run("xla", on_mesh=False), on_mesh, min_grads=5)
