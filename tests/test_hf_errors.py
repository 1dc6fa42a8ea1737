"""Bad checkpoints fail with a message naming the tensor (and both shapes) or the field."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import qwen_jax
from qwen_jax.interop.hf import CheckpointError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = qwen_jax.preset("tiny", vocab_size=64, num_hidden_layers=4)
    model = qwen_jax.Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("hf")
    qwen_jax.save_hf(model, path)
    return path


def _rewrite(src, dst, edit):
    """Copy an HF dir with its tensors edited by edit(dict) -> dict."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    name = "model.layers.1.linear_attn.in_proj_z.weight"

    def edit(tensors):
        tensors[name] = np.zeros((7, 128), np.float32)
        return tensors

    with pytest.raises(CheckpointError, match=rf"{name}.*\(7, 128\).*\(128, 128\)"):
        qwen_jax.load_hf(_rewrite(hf_dir, tmp_path / "bad", edit))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    name = "model.layers.3.self_attn.k_norm.weight"

    def edit(tensors):
        del tensors[name]
        return tensors

    with pytest.raises(CheckpointError, match=name):
        qwen_jax.load_hf(_rewrite(hf_dir, tmp_path / "bad", edit))


def test_unknown_model_type_lists_supported(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "llama"
    bad = _rewrite(hf_dir, tmp_path / "bad", lambda t: t)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'llama'.*qwen3_5_text"):
        qwen_jax.load_hf(bad)


def test_vision_language_prefix_loads_text_part(hf_dir, tmp_path):
    """A qwen3_5 (text + vision) checkpoint: weights under model.language_model., vision ignored."""
    def edit(tensors):
        renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
        renamed["model.visual.patch_embed.proj.bias"] = np.zeros(4, np.float32)
        renamed["mtp.fc.weight"] = np.zeros((2, 2), np.float32)
        return renamed

    vlm = _rewrite(hf_dir, tmp_path / "vlm", edit)
    text = json.loads((hf_dir / "config.json").read_text())
    (vlm / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": True}))
    # The same config and bit-identical parameters as the text-only checkpoint: the same model
    # (and so the same logits), checked without running a forward op by op twice.
    text_model, model = qwen_jax.load_hf(hf_dir), qwen_jax.load_hf(vlm)
    assert model.config == text_model.config
    ours, theirs = nnx.state(model, nnx.Param), nnx.state(text_model, nnx.Param)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    config = qwen_jax.preset("tiny-moe", vocab_size=64, num_hidden_layers=4)
    path = tmp_path_factory.mktemp("hf_moe")
    qwen_jax.save_hf(qwen_jax.Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)), path)
    return path


def test_missing_expert_is_named(moe_dir, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"

    def edit(tensors):
        del tensors[name]
        return tensors

    with pytest.raises(CheckpointError, match=rf"missing.*{name}"):
        qwen_jax.load_hf(_rewrite(moe_dir, tmp_path / "bad", edit))


def test_wrong_expert_shape_names_tensor_and_both_shapes(moe_dir, tmp_path):
    name = "model.layers.0.mlp.experts.1.down_proj.weight"

    def edit(tensors):
        tensors[name] = np.zeros((128, 95), np.float32)
        return tensors

    with pytest.raises(CheckpointError, match=rf"{name}.*\(128, 95\).*\(128, 96\)"):
        qwen_jax.load_hf(_rewrite(moe_dir, tmp_path / "bad", edit))


def test_qwen3_next_with_dense_layers_is_refused_by_field(moe_dir, tmp_path):
    config = json.loads((moe_dir / "config.json").read_text())
    config.update(model_type="qwen3_next", mlp_only_layers=[1])
    bad = _rewrite(moe_dir, tmp_path / "bad", lambda t: t)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        qwen_jax.load_hf(bad)
