"""Early-fusion training: the packed image/video-text step scores each piece as the plain VLM forward
does on that piece alone, and `qwen-jax train` runs (sharded) on the default image and video data,
counting bad records."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.config import TINY, VISION_PRESETS, TrainConfig
from qwen_jax.data import (
    VISION_TOKENS,
    ImageProcessorConfig,
    MM_ROW_KEYS,
    VIDEO_ROW_KEYS,
    VideoProcessorConfig,
    add_vision_tokens,
    digits_image_text_records,
    moving_digit_records,
    pack_mm_corpus,
    python_docs_corpus,
    train_bpe_tokenizer,
)
from qwen_jax.experiment import load_config
from qwen_jax.generate.loading import load_for_generation
from qwen_jax.model.decoder import Qwen35ForCausalLM
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics
from qwen_jax.train.step import loss_fn

SEQ_LEN, MAX_PATCHES, BATCH = 96, 64, 2
KEYS = MM_ROW_KEYS + VIDEO_ROW_KEYS


@pytest.fixture(scope="module")
def setup():
    texts = python_docs_corpus()[:30]
    tokenizer = train_bpe_tokenizer(texts, 500, tuple(VISION_TOKENS.values()))
    # Two layers, one of each kind: every path of the hybrid stack at half the compile time.
    config = TINY.replace(vocab_size=500, vision=VISION_PRESETS["tiny"], dtype="float32",
                          num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                          **add_vision_tokens(tokenizer))
    images = digits_image_text_records(ImageProcessorConfig(min_pixels=32 * 32,
                                                            max_pixels=64 * 64), limit=30)
    videos = moving_digit_records(VideoProcessorConfig(min_pixels=32 * 32, max_pixels=4 * 64 * 64,
                                                       max_frames=8), limit=30)
    # Short texts between captioned digits and moving digits: rows of several pieces.
    mixed = [part for parts in zip((text[:50] for text in texts), images, videos) for part in parts]
    corpus = pack_mm_corpus(tokenizer, mixed, config, seq_len=SEQ_LEN, max_patches=MAX_PATCHES,
                            max_video_patches=MAX_PATCHES)
    rows = [row for row in map(corpus.row, range(corpus.num_rows))
            if row["num_images"] and row["num_videos"]][:BATCH]  # text, an image and a video
    return config, {key: np.stack([row[key] for row in rows]) for key in KEYS}


def take_items(batch, row, kind, tokens, used):
    """The pixels and grids of the next `kind` items of a row that cover `tokens` placeholder
    tokens, after the first `used` items; (inputs, items taken)."""
    pixels, grids = (("pixel_values", "image_grid_thw") if kind == "image"
                     else ("pixel_values_videos", "video_grid_thw"))
    all_grids = batch[grids][row, :batch[f"num_{kind}s"][row]]
    merged = np.cumsum(np.prod(all_grids, axis=1) // 4)
    before = merged[used - 1] if used else 0
    count = int(np.searchsorted(merged, before + tokens) - used + 1) if tokens else 0
    if not count:
        return {}, 0
    assert merged[used + count - 1] - before == tokens
    patch_start = before * 4
    return ({pixels: batch[pixels][row, patch_start:merged[used + count - 1] * 4],
             grids: all_grids[used:used + count]}, count)


def reference_loss(model, batch):
    """CE summed over every piece of every row, each piece run alone through the VLM forward with
    its own images and HF's positions (nothing of the pipeline's positions or padding)."""
    total = 0.0
    cfg = model.config
    for row in range(BATCH):
        used = {"image": 0, "video": 0}
        for segment in range(1, batch["segment_ids"][row].max() + 1):
            where = batch["segment_ids"][row] == segment
            ids = batch["input_ids"][row][where]
            pixels = {}
            for kind, token in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
                inputs, count = take_items(batch, row, kind, int(np.sum(ids == token)), used[kind])
                pixels.update(inputs)
                used[kind] += count
            logits = model(jnp.asarray(ids[None]), **pixels).logits[0]
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            targets = batch["targets"][row][where]
            picked = np.take_along_axis(np.asarray(logprobs), targets[:, None], axis=1)[:, 0]
            total -= float(np.sum(picked * batch["loss_mask"][row][where]))
    return total


def test_packed_step_scores_each_piece_like_the_vlm_forward_alone(setup):
    config, batch = setup
    assert batch["segment_ids"].max() >= 2 and batch["num_videos"].min() >= 1
    model = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    count = float(batch["loss_mask"].sum())
    loss, parts = jax.jit(loss_fn, static_argnums=(1, 3))(
        params, graphdef, {key: jnp.asarray(value) for key, value in batch.items()
                           if not key.startswith("num_")},
        TrainConfig(batch_size=BATCH, seq_len=SEQ_LEN, ce_chunk=32), count)
    np.testing.assert_allclose(float(parts["ce"]) * count, reference_loss(model, batch), rtol=1e-5)


@pytest.mark.slow
def test_train_cli_config_runs_on_images_and_videos_and_counts_bad_records(tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join([
        json.dumps({"text": "A ghost.", "images": ["ghost.png"]}), "not json",
        json.dumps({"images": []}),
        json.dumps({"parts": [{"video": "lost.mp4"}, {"text": "A lost clip."}]})]) + "\n")
    config = load_config("configs/pretrain_mm_tiny.py", [
        # Eight rows on the eight test devices: the image-text step runs sharded.
        "train.steps=2", "train.batch_size=8", "train.seq_len=64", "train.eval_every=2",
        "train.eval_batches=1", "data.max_patches=64", "wandb.mode=disabled",
        "model.num_hidden_layers=2", f"data.image_sources=['photos', '{tmp_path / 'bad.jsonl'}']"])
    rows = run_training(config, tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[-1]["data/skipped/missing_image"] == 1 and rows[-1]["data/skipped/bad_json"] == 1
    assert rows[-1]["data/skipped/missing_field"] == 1 and rows[-1]["data/skipped/missing_video"] == 1
    assert np.isfinite(rows[-1]["eval/loss"]) and rows[-1]["data/tokens"] > 0
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 2
    # The workdir reloads as a VLM with the tokenizer's vision ids, for generation.
    model, tokenizer, _ = load_for_generation(tmp_path / "run")
    assert model.visual is not None
    assert model.config.image_token_id == tokenizer.token_to_id("<|image_pad|>")
    strict = load_config("configs/pretrain_mm_tiny.py", [
        "data.strict=True", "wandb.mode=disabled",
        f"data.image_sources=['{tmp_path / 'bad.jsonl'}']"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing_image: .*ghost\.png"):
        run_training(strict, tmp_path / "strict")
