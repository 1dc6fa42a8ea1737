"""Logits parity with transformers' Qwen3_5ForCausalLM (fp32, pure PyTorch paths), both directions."""

import numpy as np
import pytest
from flax import nnx
from hf_reference import build_hf_model, hf_logits, hf_text_config, relative_error
from transformers import Qwen3_5ForCausalLM

import qwen_jax

# Together these cover: T not a multiple of 64 spanning several chunks, batch > 1, Hv = Hk and
# Hv = 2 Hk, dk != dv, head_dim != 256, a non-default mrope_section, tied and untied heads, layer
# counts that are not multiples of 4, and a layer pattern that does not start with GDN layers.
CASES = {
    "gva_untied_6_layers": (dict(value_heads=4, key_dim=16, value_dim=24, tied=False, layers=6,
                                 mrope_section=(2, 1, 1)), (2, 150)),
    "equal_heads_tied_5_layers": (dict(value_heads=2, key_dim=24, value_dim=16, tied=True, layers=5,
                                       head_dim=48, mrope_section=(3, 2, 1)), (3, 70)),
    "attention_first_pattern": (dict(layers=3, head_dim=64, mrope_section=(4, 2, 2), tied=False,
                                     layer_types=["full_attention", "linear_attention",
                                                  "full_attention"]), (1, 131)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(HF model, its save_pretrained dir, input ids) for one config."""
    config_kwargs, shape = CASES[request.param]
    hf_model = build_hf_model(hf_text_config(**config_kwargs))
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    ids = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, shape)
    return hf_model, path, ids


@pytest.fixture(scope="module")
def loaded(case):
    """Our model loaded from the case's directory, once per case (so its forward compiles once)."""
    return qwen_jax.load_hf(case[1])


@nnx.jit
def forward_logits(model, ids, segment_ids=None):
    return model(ids, segment_ids=segment_ids).logits


def test_load_hf_matches_transformers(case, loaded):
    hf_model, path, ids = case
    assert relative_error(forward_logits(loaded, ids), hf_logits(hf_model, ids)) < 1e-4


def test_save_hf_round_trips_through_transformers(case, loaded, tmp_path):
    hf_model, path, ids = case
    qwen_jax.save_hf(loaded, tmp_path)
    reloaded = Qwen3_5ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert relative_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) < 1e-6


def alone_logits(model, documents, shape):
    """Each document's logits with nothing before it and no segment ids: right-padded with zeros
    into batches of the test ids' shape (the shape whose forward is compiled already; the forward
    is causal, so the padding after a document changes none of its logits)."""
    rows, _ = shape
    out = []
    for first in range(0, len(documents), rows):
        batch = documents[first : first + rows]
        ids = np.zeros(shape, np.int64)
        for row, document in enumerate(batch):
            ids[row, : len(document)] = document
        logits = np.asarray(forward_logits(model, ids))
        out += [logits[row, : len(document)] for row, document in enumerate(batch)]
    return out


def test_segment_positions_restart_per_document(case, loaded):
    """A packed row gives each document exactly the logits it has alone."""
    hf_model, path, ids = case
    row = ids[0]
    cut = len(row) // 3
    segment_ids = np.where(np.arange(len(row)) < cut, 1, 2)[None]
    packed = np.asarray(forward_logits(loaded, row[None], segment_ids))[0]
    first, second = alone_logits(loaded, [row[:cut], row[cut:]], ids.shape)
    # Chunk boundaries fall elsewhere in the two runs, so agreement is fp32 rounding, not bitwise.
    assert relative_error(packed[:cut], first) < 1e-4
    assert relative_error(packed[cut:], second) < 1e-4
