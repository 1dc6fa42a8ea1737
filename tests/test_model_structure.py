"""Parameter counts of every preset (and Qwen3-Next-80B) against transformers; HLO size that stays
flat in depth."""

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from hf_reference import HF_CLASSES
from transformers import (Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3_5VisionConfig,
                          Qwen3_5VisionModel, Qwen3NextConfig)

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import VISION_PRESETS
from qwen_jax.cli import main
from qwen_jax.interop.hf import config_from_hf, config_to_hf
from qwen_jax.model.counts import parameter_counts
from qwen_jax.model.vision import VisionModel

DENSE_PRESETS = ["qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-27b"]
SPEC_TEXT_PARAMS = {  # spec section 6.1 table
    "qwen3.5-0.8b": 752_393_024, "qwen3.5-2b": 1_881_825_088, "qwen3.5-4b": 4_205_751_296,
    "qwen3.5-9b": 8_953_803_264, "qwen3.5-27b": 26_895_998_464,
}

SPEC_VISION_PARAMS = {  # spec section 6.1 table
    "qwen3.5-0.8b": 100_592_896, "qwen3.5-2b": 331_416_576, "qwen3.5-4b": 333_514_240,
    "qwen3.5-9b": 456_010_480, "qwen3.5-27b": 460_730_096,
}

MOE_PRESETS = ["qwen3.5-35b-a3b", "qwen3.5-122b-a10b", "qwen3.5-397b-a17b", "tiny-moe"]
HF_CONFIGS = {"qwen3_5_text": Qwen3_5TextConfig, "qwen3_5_moe_text": Qwen3_5MoeTextConfig,
              "qwen3_next": Qwen3NextConfig}


def transformers_param_count(config) -> int:
    """transformers' own count for the same config, instantiated on the meta device."""
    hf = config_to_hf(config)
    hf_config = HF_CONFIGS[hf["model_type"]](**hf)
    with torch.device("meta"):
        model = HF_CLASSES[type(hf_config)](hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", DENSE_PRESETS)
def test_preset_param_count_matches_transformers_and_spec(name):
    config = preset(name)
    total, active = parameter_counts(config)
    assert total == active == transformers_param_count(config)
    assert total == SPEC_TEXT_PARAMS[name]


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_moe_preset_param_count_matches_transformers(name):
    config = preset(name)
    total, active = parameter_counts(config)
    assert total == transformers_param_count(config)
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    assert total - active == config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * expert


def test_qwen3_next_80b_param_count_matches_transformers():
    config = config_from_hf(Qwen3NextConfig().to_dict())  # HF's defaults are the 80B-A3B model
    assert (config.num_experts, config.num_experts_per_tok, config.architecture) == (512, 10, "qwen3_next")
    total, active = parameter_counts(config)
    assert total == transformers_param_count(config)
    assert 79e9 < total < 82e9 and 2.5e9 < active < 4e9


@pytest.mark.parametrize("name", sorted(VISION_PRESETS))
def test_published_vision_tower_param_count_matches_transformers(name):
    """The tower alone (against the spec's figure where it gives one) and beside the text stack."""
    config = preset(name, vision=VISION_PRESETS[name])
    tower = nnx.eval_shape(lambda: VisionModel(
        config.vision, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(tower, nnx.Param)))
    with torch.device("meta"):
        hf_tower = Qwen3_5VisionModel(Qwen3_5VisionConfig(**config_to_hf(config)["vision_config"]))
    assert ours == sum(p.numel() for p in hf_tower.parameters()) == SPEC_VISION_PARAMS.get(name, ours)
    text_only, _ = parameter_counts(preset(name))
    assert parameter_counts(config)[0] == text_only + ours


def test_info_prints_total_and_active_counts(capsys):
    main(["info", "--preset=qwen3.5-35b-a3b"])
    total, active = parameter_counts(preset("qwen3.5-35b-a3b"))
    printed = capsys.readouterr().out
    assert f"{total:,}" in printed and f"{active:,}" in printed and "active parameters" in printed


def lowered_hlo_size(num_layers: int) -> int:
    config = preset("tiny", num_hidden_layers=num_layers)
    model = nnx.eval_shape(lambda: Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    return len(jax.jit(forward).lower(state, ids).as_text())


def test_hlo_size_is_flat_in_depth():
    small, large = lowered_hlo_size(4), lowered_hlo_size(16)
    assert abs(large - small) / small < 0.10, (small, large)
