"""Vision-language parity with transformers' Qwen3_5ForConditionalGeneration (fp32, eager paths): the
vision tower, the 3-D positions, the fused logits, and the save_hf round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import VISION_TOKEN_IDS, build_hf_model, hf_vlm_config, relative_error
from safetensors.numpy import load_file, save_file
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

import qwen_jax
from qwen_jax.interop.hf import CheckpointError
from qwen_jax.model.positions import rope_index

IMAGE, VIDEO, START, END = (VISION_TOKEN_IDS[k] for k in (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
MERGE = 2
# Grids (t, h, w) in patches: h below and w above the 16 x 16 learned position grid, one smaller
# than it, and a two-frame video.
WIDE, SMALL, VIDEO_GRID = (1, 6, 20), (1, 4, 4), (2, 4, 6)


def text(rng, n):
    return list(rng.integers(0, 200, n))


def image_tokens(grid, token=IMAGE):
    return [START] + [token] * (int(np.prod(grid)) // MERGE**2) + [END]


def video_tokens(grid, rng):
    """Qwen3.5's layout: each frame is its own <start> pads <end> run, with timestamp text between."""
    t, h, w = grid
    frames = [image_tokens((1, h, w), VIDEO) for _ in range(t)]
    return sum((frame + text(rng, 2) for frame in frames[:-1]), []) + frames[-1]


def sample(rows, image_grids=(), video_grids=(), seed=0):
    """rows: lists of ids -> a dict of model inputs (numpy), pixel values random per patch."""
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": np.asarray(rows, np.int32)}
    for grids, pixels, grid_name in ((image_grids, "pixel_values", "image_grid_thw"),
                                     (video_grids, "pixel_values_videos", "video_grid_thw")):
        if grids:
            patches = int(sum(np.prod(g) for g in grids))
            inputs[pixels] = rng.normal(size=(patches, 3 * 2 * 16 * 16)).astype(np.float32)
            inputs[grid_name] = np.asarray(grids, np.int32)
    return inputs


def build_cases():
    rng = np.random.default_rng(1)
    one = text(rng, 5) + image_tokens(WIDE) + text(rng, 4)
    two = text(rng, 3) + image_tokens(WIDE) + text(rng, 2) + image_tokens(SMALL) + text(rng, 3)
    # Two rows, an image and a video in the first: grids are taken in row-major order of their tokens.
    first = text(rng, 2) + image_tokens(SMALL) + text(rng, 3) + video_tokens(VIDEO_GRID, rng) + text(rng, 2)
    second = text(rng, 6) + image_tokens(WIDE)
    first += text(rng, len(second) - len(first))  # rows of one length
    return {
        "one_image": sample([one], [WIDE]),
        "two_images": sample([two], [WIDE, SMALL]),
        "two_rows_image_and_video": sample([first, second], [SMALL, WIDE], [VIDEO_GRID]),
        "text_only": sample([text(rng, 40)]),
    }


CASES = build_cases()


def torch_inputs(inputs):
    """Our inputs -> HF's keyword arguments (HF also wants the processor's mm_token_type_ids)."""
    out = {k: torch.as_tensor(v, dtype=torch.long if "grid" in k or k == "input_ids" else torch.float32)
           for k, v in inputs.items()}
    ids = inputs["input_ids"]
    out["mm_token_type_ids"] = torch.as_tensor(np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0)))
    return out


def hf_logits(model, inputs):
    with torch.no_grad():
        return model(**torch_inputs(inputs)).logits.numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, its save_pretrained dir, our model loaded from it). GVA, untied head."""
    hf_model = build_hf_model(hf_vlm_config(value_heads=4, tied=False, layers=4))
    path = tmp_path_factory.mktemp("vlm")
    hf_model.save_pretrained(path)
    return hf_model, path, qwen_jax.load_hf(path)


@nnx.jit
def forward_logits(model, inputs):
    return model(**inputs).logits


def test_config_and_tensors_load(reference):
    _, _, model = reference
    vision = model.config.vision
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (2, 64, 4, 64)
    assert model.config.image_token_id == IMAGE and model.config.video_token_id == VIDEO


def test_vision_tower_matches_transformers(reference):
    """Several images in one call, one of them two frames: attention stays inside each frame."""
    hf_model, _, model = reference
    inputs = sample([[0]], [WIDE, VIDEO_GRID, SMALL])
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        expected = hf_model.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grid))
    ours = nnx.jit(lambda m, p, g: m.visual(p, g))(model, pixels, grid)
    assert ours.shape == (int(np.prod(grid, axis=1).sum()) // 4, 64)
    assert relative_error(ours, expected.pooler_output.numpy()) < 1e-4


@pytest.mark.parametrize("name", sorted(set(CASES) - {"text_only"}))
def test_positions_match_get_rope_index(reference, name):
    hf_model, _, model = reference
    inputs = CASES[name]
    grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    hf = torch_inputs(inputs)
    expected, _ = hf_model.model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf.get("image_grid_thw"),
        video_grid_thw=hf.get("video_grid_thw"))
    ours = rope_index(inputs["input_ids"], grids["image_grid_thw"], model.config,
                      video_grid_thw=grids["video_grid_thw"])
    assert isinstance(ours, np.ndarray)  # numpy in, numpy out: usable by the data pipeline
    np.testing.assert_array_equal(ours, expected.numpy())
    traced = jax.jit(lambda ids, image, video: rope_index(ids, image, model.config, video_grid_thw=video))
    np.testing.assert_array_equal(traced(*(jnp.asarray(x) if x is not None else None for x in (
        inputs["input_ids"], grids["image_grid_thw"], grids["video_grid_thw"]))), expected.numpy())


def test_positions_restart_after_left_padding_as_hf(reference):
    """Segment 0 (left padding) then a document: its positions are HF's under attention_mask."""
    hf_model, _, model = reference
    inputs = CASES["two_images"]
    ids = np.concatenate([np.zeros((1, 3), np.int32), inputs["input_ids"]], axis=1)
    mask = (np.arange(ids.shape[1]) >= 3).astype(np.int32)[None]
    hf = torch_inputs({**inputs, "input_ids": ids})
    expected, _ = hf_model.model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf["image_grid_thw"],
        attention_mask=torch.as_tensor(mask))
    ours = rope_index(ids, inputs["image_grid_thw"], model.config, segment_ids=mask)
    np.testing.assert_array_equal(ours[:, mask.astype(bool)], expected.numpy()[:, mask.astype(bool)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(reference, name):
    hf_model, _, model = reference
    inputs = CASES[name]
    assert relative_error(forward_logits(model, inputs), hf_logits(hf_model, inputs)) < 1e-4


def test_save_hf_round_trips_through_transformers(reference, tmp_path):
    hf_model, _, model = reference
    qwen_jax.save_hf(model, tmp_path)
    reloaded = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for name in ("two_images", "two_rows_image_and_video"):
        assert relative_error(hf_logits(reloaded, CASES[name]), hf_logits(hf_model, CASES[name])) < 1e-6


def test_moe_vision_language_model_matches_and_round_trips(tmp_path):
    """Qwen3_5MoeForConditionalGeneration: the same tower beside a MoE text stack."""
    hf_model = build_hf_model(hf_vlm_config(moe=True, experts=4, top_k=2, layers=4))
    hf_model.save_pretrained(tmp_path / "hf")
    model = qwen_jax.load_hf(tmp_path / "hf")
    inputs = CASES["two_images"]
    expected = hf_logits(hf_model, inputs)
    assert relative_error(forward_logits(model, inputs), expected) < 1e-4
    qwen_jax.save_hf(model, tmp_path / "ours")
    reloaded = Qwen3_5MoeForConditionalGeneration.from_pretrained(
        tmp_path / "ours", attn_implementation="eager", experts_implementation="eager").eval()
    assert relative_error(hf_logits(reloaded, inputs), expected) < 1e-6


@nnx.jit
def cached_forward(model, inputs, cache):
    out = model(**inputs, cache=cache)
    return out.logits, out.cache


def test_cached_prefill_then_decode_matches_one_forward(reference):
    """With a cache, the text after the images continues from the largest position + 1 (HF's
    rope_deltas), so a prefill then a decode step give the full forward's logits."""
    _, _, model = reference
    inputs = CASES["two_images"]
    ids = inputs["input_ids"]
    full = np.asarray(forward_logits(model, inputs))
    prompt = {**inputs, "input_ids": ids[:, :-1]}
    prompt_logits, cache = cached_forward(model, prompt, model.init_cache(1, ids.shape[1]))
    last, _ = cached_forward(model, {"input_ids": ids[:, -1:]}, cache)
    assert relative_error(np.concatenate([prompt_logits, last], axis=1), full) < 1e-4


def test_mismatched_inputs_name_the_tensors_and_counts(reference):
    _, _, model = reference
    inputs = CASES["one_image"]
    ids = inputs["input_ids"]
    fewer = np.where(np.arange(ids.shape[1]) == np.argmax(ids[0] == IMAGE), 7, ids)
    with pytest.raises(ValueError, match=r"input_ids holds 29 image tokens.*gives 30"):
        model(**{**inputs, "input_ids": fewer})
    with pytest.raises(ValueError, match=r"\[\[1, 6, 20\]\] covers 120 patches.*pixel_values has 116"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:116]})
    with pytest.raises(ValueError, match=r"pixel_values must be \[num_patches, 1536\]"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :100]})
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        model(**{**inputs, "image_grid_thw": np.array([[1, 5, 24]])})
    with pytest.raises(ValueError, match="pixel_values needs image_grid_thw"):
        model(ids, pixel_values=inputs["pixel_values"])


def test_text_only_model_refuses_pixels():
    config = qwen_jax.preset("tiny", vocab_size=256)
    model = nnx.eval_shape(lambda: qwen_jax.Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    inputs = CASES["one_image"]
    with pytest.raises(ValueError, match=r"pixel_values, image_grid_thw given but this model has no vision"):
        model(**inputs)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.visual.blocks.1.attn.qkv.bias"),
     r"missing.*model\.visual\.blocks\.1\.attn\.qkv\.bias"),
    (lambda t: t.update({"model.visual.pos_embed.weight": np.zeros((100, 64), np.float32)}),
     r"model\.visual\.pos_embed\.weight.*\(100, 64\).*\(256, 64\)"),
    (lambda t: t.update({"model.visual.blocks.2.norm1.weight": np.zeros(64, np.float32)}),
     r"model\.visual\.blocks\.2\.norm1\.weight.*not part of this model"),
])
def test_bad_vision_tensors_are_named(reference, tmp_path, edit, message):
    _, path, _ = reference
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        qwen_jax.load_hf(tmp_path)


def test_greedy_generation_with_images_matches_transformers(reference):
    """Image prompts through `generate`: the same new tokens as HF's greedy generate, and a batch of
    two prompts of different lengths gives each row what it gives alone."""
    from qwen_jax.generate.engine import generate

    hf_model, _, model = reference
    inputs = CASES["two_images"]
    with torch.no_grad():
        expected = hf_model.generate(**torch_inputs(inputs), max_new_tokens=6, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, inputs["input_ids"].shape[1]:]
    images = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    alone = generate(model, inputs["input_ids"].tolist(), max_new_tokens=6, **images)
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), expected.numpy())

    short = CASES["one_image"]
    batch = generate(model, [inputs["input_ids"][0].tolist(), short["input_ids"][0].tolist()],
                     max_new_tokens=6,
                     pixel_values=np.concatenate([inputs["pixel_values"], short["pixel_values"]]),
                     image_grid_thw=np.concatenate([inputs["image_grid_thw"], short["image_grid_thw"]]))
    single = generate(model, short["input_ids"].tolist(), max_new_tokens=6,
                      pixel_values=short["pixel_values"], image_grid_thw=short["image_grid_thw"])
    np.testing.assert_array_equal(np.asarray(batch.tokens), np.stack([alone.tokens[0], single.tokens[0]]))


def test_packed_row_with_a_video_an_image_and_text_matches_transformers(tmp_path):
    """A document made by the pipeline (timestamped video blocks from `preprocess_video`, an image,
    text) scores as HF's model scores the same tokens and pixels: positions equal get_rope_index,
    logits within 1e-4 (our side runs the train step's per-row layout); and as a prompt it
    generates HF's greedy tokens."""
    from qwen_jax.data import (VISION_TOKENS, ImageProcessorConfig, ImageTextRecord,
                               VideoProcessorConfig, add_vision_tokens, pack_mm_corpus,
                               preprocess_image, preprocess_video, python_docs_corpus,
                               train_bpe_tokenizer)
    from qwen_jax.data.clips import digit_clip
    from qwen_jax.train.step import model_inputs

    tokenizer = train_bpe_tokenizer(python_docs_corpus()[:5], 300, tuple(VISION_TOKENS.values()))
    config = hf_vlm_config(layers=4, vocab=300)
    for field, token_id in add_vision_tokens(tokenizer).items():
        setattr(config, field, token_id)
    build_hf_model(config).save_pretrained(tmp_path)
    hf_model = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = qwen_jax.load_hf(tmp_path)

    rng = np.random.default_rng(0)
    ink = rng.integers(0, 17, (8, 8)).astype(np.float64)
    # Ten frames at 4 fps, sampled at 2 fps: 5 frames, padded to 3 temporal patches.
    video = preprocess_video(digit_clip(ink, "left to right", frames=10), 4.0,
                             VideoProcessorConfig(min_pixels=32 * 32, max_pixels=6 * 64 * 64))
    image = preprocess_image(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8),
                             ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 96))
    # Frames 0, 2, 4, 7, 9 (and 9 again): each temporal patch at its two frames' mean time.
    assert video.grid_thw == (3, 4, 4) and video.timestamps == (0.25, 1.375, 2.25)
    record = ImageTextRecord(parts=("Look at", image, "and then at", video, "a digit moving."),
                             source="test")
    corpus = pack_mm_corpus(tokenizer, [record], model.config, seq_len=128, max_patches=64,
                            max_video_patches=64)
    row = corpus.row(0)
    length = int((row["segment_ids"] > 0).sum())
    text = tokenizer.decode(row["input_ids"][:length].tolist(), skip_special_tokens=False)
    block = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert f"and then at<0.2 seconds>{block}<1.4 seconds>{block}<2.2 seconds>{block}a digit" in text

    ids = row["input_ids"][None, :length]
    hf = torch_inputs({"input_ids": ids, "pixel_values": image.pixel_values,
                       "image_grid_thw": np.array([image.grid_thw]),
                       "pixel_values_videos": video.pixel_values,
                       "video_grid_thw": np.array([video.grid_thw])})
    hf["mm_token_type_ids"] = torch.as_tensor(np.where(
        ids == model.config.image_token_id, 1, np.where(ids == model.config.video_token_id, 2, 0)))
    expected_positions, _ = hf_model.model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf["image_grid_thw"],
        video_grid_thw=hf["video_grid_thw"])
    np.testing.assert_array_equal(row["positions"][:, :length], expected_positions.numpy()[:, 0])
    with torch.no_grad():
        expected = hf_model(**hf).logits.numpy()
    batch = {key: jnp.asarray(value[None]) for key, value in row.items()}
    ours = nnx.jit(lambda m, b: m(b["input_ids"], **model_inputs(b)).logits)(model, batch)
    assert relative_error(np.asarray(ours)[:, :length], expected) < 1e-4

    # The same document but its eos as a prompt: greedy generation gives HF's new tokens.
    from qwen_jax.generate.engine import generate

    prompt = {key: value[:, :-1] if key in ("input_ids", "mm_token_type_ids") else value
              for key, value in hf.items()}
    with torch.no_grad():
        hf_tokens = hf_model.generate(**prompt, attention_mask=torch.ones_like(prompt["input_ids"]),
                                      max_new_tokens=5, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, length - 1:]
    pixels = {key: value.numpy() for key, value in prompt.items()
              if key not in ("input_ids", "mm_token_type_ids")}
    generated = generate(model, ids[:, :-1].tolist(), max_new_tokens=5, **pixels)
    np.testing.assert_array_equal(np.asarray(generated.tokens[0]), hf_tokens.numpy())
