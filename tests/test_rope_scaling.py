"""YaRN RoPE scaling == transformers': frequencies, attention factor, cos/sin tables, and a loaded model's logits."""

import numpy as np
import pytest
import torch
from transformers import Qwen3_5TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

import qwen_jax
from qwen_jax.config import ConfigError, ModelConfig, RopeScaling
from qwen_jax.model.rope import rope_cos_sin, rope_inv_freq
from hf_reference import build_hf_model, hf_logits, hf_text_config, relative_error

# (HF rope_parameters beyond the type): Qwen3.5's published long-context setting, HF's other knobs.
YARN_CASES = [
    {"factor": 4.0, "original_max_position_embeddings": 262144},
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0, "beta_slow": 2.0,
     "truncate": False},
    {"factor": 2.0, "original_max_position_embeddings": 2048, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0, "original_max_position_embeddings": 8192, "attention_factor": 1.3},
]


def hf_rope_config(yarn: dict, *, head_dim=256, partial=0.25, theta=1e7) -> Qwen3_5TextConfig:
    rope = {"rope_type": "yarn", "rope_theta": theta, "partial_rotary_factor": partial,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True, **yarn}
    return Qwen3_5TextConfig(head_dim=head_dim, max_position_embeddings=4 * 262144, rope_parameters=rope)


@pytest.mark.parametrize("yarn", YARN_CASES)
def test_yarn_frequencies_and_attention_factor_equal_transformers(yarn):
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_rope_config(yarn))
    inv_freq, factor = rope_inv_freq(64, 1e7, RopeScaling(**yarn))
    np.testing.assert_array_equal(inv_freq, expected_inv_freq.numpy())
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("theta, dim", [(1e7, 64), (1e4, 32), (1e4, 36)])  # text; vision heads of 64 and 72
def test_published_rope_frequencies_equal_torchs_to_the_bit(theta, dim):
    """One ulp of an inverse frequency turns cos and sin by up to 0.03 at 1M positions. NumPy 2.4.6's float32
    power misses torch's at 7 of the 32 text slots and 1 of 16, 5 of 18 vision slots."""
    expected = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    np.testing.assert_array_equal(rope_inv_freq(dim, theta)[0], expected.numpy())


def test_yarn_cos_sin_equal_transformers_rotary_embedding():
    yarn = YARN_CASES[0]
    config = hf_rope_config(yarn)
    positions = np.stack([np.arange(0, 1_000_000, 99_991)[:9], np.arange(9) * 123_457])  # [2, 9], past 262K
    hf_positions = torch.as_tensor(np.broadcast_to(positions[None], (3, 2, 9)).copy())
    hf_cos, hf_sin = Qwen3_5TextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), hf_positions)
    cos, sin = rope_cos_sin(positions, rotary_dim=64, theta=1e7, mrope_section=(11, 11, 10), dtype=np.float32,
                            scaling=RopeScaling(**yarn))
    np.testing.assert_allclose(cos, hf_cos.numpy(), atol=2e-5)
    np.testing.assert_allclose(sin, hf_sin.numpy(), atol=2e-5)


def test_loaded_yarn_model_matches_transformers_and_round_trips(tmp_path):
    config = hf_text_config()
    config.rope_parameters.update(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    hf_model = build_hf_model(config)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))  # past the original 16 positions
    model = qwen_jax.load_hf(tmp_path / "hf")
    assert model.config.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=16)
    assert relative_error(np.asarray(model(ids).logits), hf_logits(hf_model, ids)) < 1e-4

    qwen_jax.save_hf(model, tmp_path / "ours")
    reloaded = type(hf_model).from_pretrained(tmp_path / "ours").float().eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    assert relative_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) < 1e-5


def test_bad_rope_scaling_names_the_field():
    with pytest.raises(ConfigError, match="model.rope_scaling.factor"):
        ModelConfig(rope_scaling={"factor": 0.0})
    with pytest.raises(ConfigError, match="model.rope_scaling.rope_type"):
        ModelConfig(rope_scaling={"rope_type": "longrope"})
