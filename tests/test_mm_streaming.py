"""Image-text documents read, decoded and packed as training goes (data.streaming, kind image_text):
in order, the rows of the in-memory packing; bad records counted as they are read; held-out records
never trained on; mixed sources; an exact resume inside a split document and across epochs."""

import json

import numpy as np
import pytest
from PIL import Image

from qwen_jax.data import (VISION_TOKENS, ImageProcessorConfig, VideoProcessorConfig, add_vision_tokens,
                           make_mm_eval_batches, pack_mm_corpus, train_bpe_tokenizer)
from qwen_jax.data.mm_pipeline import row_budget
from qwen_jax.data.mm_streaming import (MMStream, media_held_out, media_records, mm_groups,
                                        mm_stream_eval_batches)
from qwen_jax.data.sources import is_held_out
from qwen_jax.data.streaming import read_document
from qwen_jax.experiment import load_config, model_config
from resume_check import assert_resume_from_step_2_repeats_the_run

IMAGES = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)
VIDEOS = VideoProcessorConfig()
SEQ_LEN = 64
WORDS = "a red square beside a blue circle under the grey sky of noon".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL file of image-text documents (some longer than a row) with bad records among them,
    and a text file; -> (image sources, text sources, skip counts of one pass)."""
    folder = tmp_path_factory.mktemp("mm")
    Image.new("RGB", (64, 48), (255, 0, 0)).save(folder / "red.png")
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    lines = []
    for i in range(60):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + (i * 17) % 70))
        parts = [{"text": words[:len(words) // 2]}, {"image": ["red.png", "noise.png"][i % 2]},
                 {"text": words[len(words) // 2:]}]
        lines.append(json.dumps({"parts": parts}))
    lines[3:3] = ['{"text": "unterminated', json.dumps({"text": "A ghost.", "images": ["ghost.png"]})]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.jsonl").write_text("\n".join(json.dumps({"text": " ".join(WORDS[k:] + WORDS[:k]) * 3})
                                                  for k in range(12)) + "\n")
    return [str(folder / "captions.jsonl"), "digits"], [str(folder / "notes.jsonl")], {
        "bad_json": 1, "missing_image": 1}


@pytest.fixture(scope="module")
def setup():
    """(model config with vision token ids, tokenizer)."""
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 20, 400, tuple(VISION_TOKENS.values()))
    config = model_config(load_config("configs/pretrain_mm_tiny.py")).replace(**add_vision_tokens(tokenizer))
    return config, tokenizer


def stream(groups, setup, seed, **kwargs):
    config, tokenizer = setup
    return MMStream(groups, tokenizer, config, row_budget(config, SEQ_LEN, 256), global_batch_size=4,
                    seed=seed, **kwargs)


def test_in_order_the_stream_packs_the_in_memory_rows(corpus, setup):
    """One group read in order: the in-memory packing of its train records (the held-out ones left
    out before any decoding), and the bad records counted as they are read."""
    image_sources, _, skipped = corpus
    config, tokenizer = setup
    records = media_records("image_sources", image_sources, IMAGES, VIDEOS)
    items = [records[index] for index in range(len(records))]
    train = [document for item in items if not media_held_out(*item[:2])
             and (document := read_document(item, strict=False)) is not None]
    assert 0 < len(items) - len(train) - sum(skipped.values()) < len(items) // 10  # ~5% held out
    want = pack_mm_corpus(tokenizer, train, config, seq_len=SEQ_LEN, max_patches=256)
    got = stream({"images": records}, setup, seed=None)
    batches = [next(got) for _ in range((want.num_rows - 1) // 4)]
    for index, row in enumerate(want.row(i) for i in range(4 * len(batches))):
        for key, value in row.items():
            np.testing.assert_array_equal(batches[index // 4][key][index % 4], value, err_msg=key)
    assert got.skipped == skipped


def test_resume_inside_a_split_document_and_across_epochs_is_exact(corpus, setup):
    image_sources, text_sources, _ = corpus
    groups = mm_groups(text_sources, image_sources[:1], [], IMAGES, VIDEOS)  # the captions, some split
    weights = {"text": 0.5, "images": 0.5}
    first = stream(groups, setup, seed=3, weights=weights)
    states, batches = [], []
    for _ in range(90):
        states.append(json.loads(json.dumps(first.get_state())))
        batches.append(next(first))
    # Resume points: inside a split document, and past an epoch of the records.
    inside = next(at for at, state in enumerate(states) if state["start"] > 0)
    epoch = len(groups["images"]) + len(groups["text"])
    past = next(at for at, state in enumerate(states) if state["record"] > epoch)
    rows = np.concatenate([batch["num_images"] for batch in batches])
    assert 0 < (rows == 0).sum() < len(rows)  # text-only rows and rows with images, mixed
    assert max(inside, past) < len(states) - 6
    for at in (1, inside, past):
        resumed = stream(groups, setup, seed=3, weights=weights)
        resumed.set_state(states[at])
        for got, want in zip([next(resumed) for _ in range(6)], batches[at:at + 6]):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert resumed.get_state() == states[at + 6]


def test_eval_batches_are_the_in_memory_packing_of_held_out_documents(corpus, setup):
    """The held-out images (by a hash of the record) then the held-out texts, packed as in memory."""
    image_sources, text_sources, _ = corpus
    config, tokenizer = setup
    groups = mm_groups(text_sources, image_sources[:1], [], IMAGES, VIDEOS)
    got = mm_stream_eval_batches(groups, tokenizer, config, row_budget(config, SEQ_LEN, 256), batch_size=4,
                                 max_batches=2)
    items = {name: [groups[name][index] for index in range(len(groups[name]))] for name in ("images", "text")}
    held_images = [document for item in items["images"] if media_held_out(*item[:2])
                   and (document := read_document(item, strict=False)) is not None]
    held_texts = [text for item in items["text"]
                  if (text := read_document(item, strict=False)) is not None and is_held_out(text)]
    assert held_images and held_texts  # this corpus holds both
    want = make_mm_eval_batches(pack_mm_corpus(tokenizer, held_images + held_texts, config, seq_len=SEQ_LEN,
                                               max_patches=256), batch_size=4, max_batches=2)
    assert len(got) == len(want) and sum(batch["num_images"].sum() for batch in got) > 0
    for a, b in zip(got, want):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_streaming_image_text_run_resumes_exactly(corpus, tmp_path, capsys):
    image_sources, text_sources, _ = corpus
    config = load_config("configs/pretrain_mm_tiny.py", [
        "wandb.mode=disabled", "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.batch_size=4",
        f"train.seq_len={SEQ_LEN}", "model.num_hidden_layers=2", "checkpoint.every_steps=2", "data.streaming=True",
        f"data.text_sources={text_sources}", f"data.image_sources={image_sources}",
        "data.video_sources=['moving_digits']"])
    assert_resume_from_step_2_repeats_the_run(config, tmp_path / "run", capsys)
