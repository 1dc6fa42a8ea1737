"""model.attention_impl: "auto" picks cuDNN only on GPU with half-precision compute, an impossible
"cudnn" fails at construction, and the unmasked is_causal path equals the materialised mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import ConfigError
from qwen_jax.model.attention import GatedAttention, resolve_attention_impl

TINY = preset("tiny", vocab_size=300, gdn_chunk_size=16)


def attention_impl(cfg) -> str:
    """The implementation a GatedAttention built from `cfg` settles on for a 16-token call."""
    layer = GatedAttention(cfg, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    return layer._implementation(jnp.dtype(cfg.dtype), 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_is_xla_on_cpu(dtype):
    assert attention_impl(TINY.replace(dtype=dtype)) == "xla"


def test_explicit_cudnn_on_cpu_fails_at_construction():
    with pytest.raises(ConfigError, match="model.attention_impl"):
        attention_impl(TINY.replace(dtype="bfloat16", attention_impl="cudnn"))


def test_resolution_on_a_gpu_backend(monkeypatch):
    """cuDNN only for half precision; float32 compute keeps "auto" on XLA and rejects "cudnn". Without a
    mesh the platform is the backend's."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_attention_impl("auto", jnp.bfloat16) == "cudnn"
    assert resolve_attention_impl("auto", jnp.float32) == "xla"
    assert resolve_attention_impl("xla", jnp.bfloat16) == "xla"
    assert resolve_attention_impl("cudnn", jnp.float16) == "cudnn"
    with pytest.raises(ConfigError, match="model.attention_impl"):
        resolve_attention_impl("cudnn", jnp.float32)


def test_is_causal_path_equals_the_all_ones_segment_mask():
    model = Qwen35ForCausalLM(TINY, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)))

    @nnx.jit
    def both(model, ids):
        return model(ids).logits, model(ids, segment_ids=jnp.ones_like(ids)).logits

    causal, masked = both(model, ids)
    np.testing.assert_allclose(np.asarray(causal), np.asarray(masked), atol=1e-5, rtol=1e-5)
