"""Qwen3.5-MoE and Qwen3-Next parity with transformers (fp32, eager experts), both expert layouts."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from hf_reference import HF_CLASSES, build_hf_model, hf_logits_and_aux, hf_moe_config, relative_error
from safetensors.numpy import load_file, save_file

import qwen_jax

# Lengths span several 64-token GDN chunks; E = 6 is not a power of two; GVA (Hv = 2 Hk) changes
# Qwen3-Next's per-group qkvz layout; one case turns Qwen3-Next's top-k renormalisation off.
CASES = {
    "qwen3_5_moe_8_experts_top2": (dict(experts=8, top_k=2, value_heads=4, tied=False, layers=5),
                                   (2, 150)),
    "qwen3_5_moe_6_experts_top3": (dict(experts=6, top_k=3, tied=True, layers=4), (1, 70)),
    "qwen3_next_6_experts_top2": (dict(next_arch=True, experts=6, top_k=2, value_heads=4,
                                       tied=False, layers=5), (2, 100)),
    "qwen3_next_unnormalised_top3": (dict(next_arch=True, experts=8, top_k=3, norm_topk_prob=False,
                                          layers=4), (1, 80)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(HF model, its save_pretrained dir (per-expert keys), input ids, HF's logits and aux loss on
    them) for one config."""
    config_kwargs, shape = CASES[request.param]
    hf_model = build_hf_model(hf_moe_config(**config_kwargs))
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    ids = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, shape)
    return hf_model, path, ids, hf_logits_and_aux(hf_model, ids)


@pytest.fixture(scope="module")
def loaded(case):
    """Our model loaded from the case's directory (once per case: its forward compiles once)."""
    return qwen_jax.load_hf(case[1])


@nnx.jit
def forward(model, ids):
    out = model(ids)
    return out.logits, out.aux_loss


def fuse_experts(source, target):
    """Rewrite a per-expert checkpoint with fused experts.gate_up_proj / experts.down_proj tensors."""
    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    prefixes = sorted({k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k})
    for prefix in prefixes:
        count = sum(k.startswith(f"{prefix}.mlp.experts.") and k.endswith("down_proj.weight")
                    for k in tensors)
        expert = lambda e, p: tensors[f"{prefix}.mlp.experts.{e}.{p}_proj.weight"]
        out[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([expert(e, "gate"), expert(e, "up")]) for e in range(count)])
        out[f"{prefix}.mlp.experts.down_proj"] = np.stack([expert(e, "down") for e in range(count)])
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def test_logits_and_aux_loss_match_transformers(case, loaded):
    _, path, ids, (hf_logits, hf_aux) = case
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in load_file(path / "model.safetensors"))
    logits, aux = forward(loaded, ids)
    assert relative_error(logits, hf_logits) < 1e-4
    assert abs(float(aux) - hf_aux) / hf_aux < 1e-4


def test_fused_expert_layout_loads_the_same_model(case, loaded, tmp_path):
    _, path, _, _ = case
    fused = fuse_experts(path, tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    # The same config and bit-identical parameters as the per-expert layout: the same model (and so
    # the same logits) without compiling its forward again for another source directory.
    model = qwen_jax.load_hf(fused)
    assert model.config == loaded.config
    ours, theirs = nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_save_hf_round_trips_through_transformers(case, loaded, tmp_path):
    hf_model, _, ids, (expected, expected_aux) = case
    qwen_jax.save_hf(loaded, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == hf_model.config.model_type
    reloaded = HF_CLASSES[type(hf_model.config)].from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager").eval()
    got, got_aux = hf_logits_and_aux(reloaded, ids)
    assert relative_error(got, expected) < 1e-6
    assert got_aux == pytest.approx(expected_aux, rel=1e-6)
