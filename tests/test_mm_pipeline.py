"""Image-text pipeline: record tokens, packing that never splits an image, positions and loss masks
at boundaries, the mixture, resume, per-host shards, worker processes, skip counts, and batches the
vision tower reads."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from qwen_jax.config import TINY, VisionConfig
from qwen_jax.data import (
    ImageProcessorConfig,
    ImageTextRecord,
    ProcessedImage,
    digits_image_text_records,
    eos_id,
    python_docs_corpus,
    train_bpe_tokenizer,
)
from qwen_jax.data.mm_packing import (
    VISION_TOKENS,
    add_vision_tokens,
    load_hf_tokenizer,
    tokenize_record,
)
from qwen_jax.data.mm_pipeline import (
    MM_ROW_KEYS,
    make_mm_train_iterator,
    pack_mm_corpus,
    vision_tower_inputs,
)
from qwen_jax.model.positions import rope_index
from qwen_jax.model.vision import VisionModel
from qwen_jax.model.vlm import scatter_features

SEQ_LEN = 48
MAX_PATCHES = 64
IMAGES = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)
TINY_TOWER = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=TINY.hidden_size, num_position_embeddings=16)


@pytest.fixture(scope="module")
def texts():
    return python_docs_corpus()[:40]


@pytest.fixture(scope="module")
def tokenizer(texts):
    tokenizer = train_bpe_tokenizer(texts, 400)
    add_vision_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def config(tokenizer):
    return TINY.replace(vocab_size=tokenizer.get_vocab_size(), vision=TINY_TOWER,
                        **add_vision_tokens(tokenizer))


@pytest.fixture(scope="module")
def digits():
    return digits_image_text_records(IMAGES, limit=60)


def fake_image(height, width, seed):
    """Random patch rows for a (1, height, width) grid: each image is recognisable by its values."""
    rows = np.random.default_rng(seed).standard_normal((height * width, 1536)).astype(np.float32)
    return ProcessedImage(rows, (1, height, width))


def interleaved_records(count, seed=0):
    """Documents of text and 2x2 .. 4x6 images in random order, some longer than a row."""
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while images of digits came and went".split()
    records = []
    for index in range(count):
        parts = []
        for _ in range(rng.integers(1, 5)):
            parts.append(" ".join(rng.choice(words, rng.integers(1, 25))))
            if rng.random() < 0.6:
                parts.append(fake_image(2 * rng.integers(1, 3), 2 * rng.integers(1, 4),
                                        seed=1000 * seed + 10 * index + len(parts)))
        records.append(ImageTextRecord(parts=tuple(parts), source=f"fake[{index}]"))
    return records


@pytest.fixture(scope="module")
def corpus(tokenizer, config):
    return pack_mm_corpus(tokenizer, interleaved_records(40), config, seq_len=SEQ_LEN,
                          max_patches=MAX_PATCHES)


def vision_ids(config):
    return config.vision_start_token_id, config.image_token_id, config.vision_end_token_id


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys() == set(MM_ROW_KEYS)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_record_tokens_put_a_block_where_each_image_stands(tokenizer, config):
    start, pad, end = vision_ids(config)
    record = ImageTextRecord(parts=("Left:", fake_image(4, 4, 0), "right", fake_image(2, 4, 1)),
                             source="hand")
    document = tokenize_record(tokenizer, record, config, eos_id(tokenizer))
    left, right = (tokenizer.encode(text).ids for text in ("Left:", "right"))
    assert document.ids.tolist() == [*left, start, *[pad] * 4, end, *right, start, *[pad] * 2, end,
                                     eos_id(tokenizer)]
    second = len(left) + 6 + len(right)
    assert document.image_spans.tolist() == [[len(left), len(left) + 6], [second, second + 4]]
    assert document.num_patches == 24


def pieces_of_rows(corpus):
    """The rows, and each row's tokens split by segment: [[ids of segment 1, ...], ...]."""
    rows = [corpus.row(index) for index in range(corpus.num_rows)]
    return rows, [[row["input_ids"][row["segment_ids"] == segment]
                   for segment in range(1, row["segment_ids"].max() + 1)] for row in rows]


def test_rows_hold_every_document_in_order_and_never_split_an_image(corpus, config):
    start, pad, end = vision_ids(config)
    rows, pieces = pieces_of_rows(corpus)
    # Concatenating all pieces gives every document's tokens, in order, nothing lost or repeated.
    np.testing.assert_array_equal(np.concatenate([p for row in pieces for p in row]),
                                  np.concatenate([document.ids for document in corpus.documents]))
    assert any(len(document.ids) > SEQ_LEN for document in corpus.documents)  # some were cut
    # ... and some cuts moved back to before an image block that would have crossed the row's end.
    assert any(end < len(corpus.documents[index].ids) and end - start < SEQ_LEN
               for row in corpus.rows for index, start, end in row)
    patches_seen = []
    for row, row_pieces in zip(rows, pieces):
        for piece in row_pieces:
            # Every block is whole inside its piece: start, then pads, then end, nothing between.
            is_start, is_end = piece == start, piece == end
            assert is_start.sum() == is_end.sum()
            for first, last in zip(np.flatnonzero(is_start), np.flatnonzero(is_end)):
                assert first < last and (piece[first + 1:last] == pad).all()
            assert ((piece == pad) <= np.isin(np.cumsum(is_start) - np.cumsum(is_end), 1)).all()
        # The images' pixels are the row's, in order, and the grids cover exactly the pad tokens.
        grids = row["image_grid_thw"][:row["num_images"]]
        assert (row["image_grid_thw"][row["num_images"]:] == 0).all()
        used = int(np.prod(grids, axis=1).sum())
        assert (row["input_ids"] == pad).sum() == used // 4 and used <= MAX_PATCHES
        assert not row["pixel_values"][used:].any()
        patches_seen.append(row["pixel_values"][:used])
    all_images = [image.pixel_values for document in corpus.documents for image in document.images]
    np.testing.assert_array_equal(np.concatenate(patches_seen), np.concatenate(all_images))


def test_a_document_that_does_not_fit_starts_a_new_row(corpus):
    for row, next_row in zip(corpus.rows, corpus.rows[1:]):
        index, start, end = next_row[0]
        if start:  # the continuation of a cut document: its row was full up to a block
            continue
        document = corpus.documents[index]
        used = sum(e - s for _, s, e in row)
        patches = sum(len(image.pixel_values) for i, s, e in row
                      for image in corpus.documents[i].images_in(s, e))
        assert (used + len(document.ids) > SEQ_LEN
                or patches + document.num_patches > MAX_PATCHES)


@pytest.mark.parametrize("max_patches, max_images, per_row", [(32, 16, 2), (64, 3, 3),
                                                                (64, 16, 4)])
def test_patch_and_image_budgets_start_new_rows(tokenizer, config, max_patches, max_images,
                                                per_row):
    # Each document is 16 patches and 9 tokens (a 6-token block, "ab", eos): 4 fill 36 tokens.
    records = [ImageTextRecord(parts=(fake_image(4, 4, i), "ab"), source=str(i)) for i in range(9)]
    assert len(tokenizer.encode("ab").ids) == 2
    corpus = pack_mm_corpus(tokenizer, records, config, seq_len=36, max_patches=max_patches,
                            max_images=max_images)
    assert [len(row) for row in corpus.rows] == [per_row] * (9 // per_row) + [9 % per_row] * (
        9 % per_row > 0)
    assert all(corpus.row(i)["num_images"] == len(corpus.rows[i]) for i in range(corpus.num_rows))


def test_segments_positions_and_loss_mask_at_boundaries(corpus, config):
    start, pad, end = vision_ids(config)
    for index in range(corpus.num_rows):
        row = corpus.row(index)
        segments, ids, mask, targets = (row[k] for k in ("segment_ids", "input_ids", "loss_mask",
                                                         "targets"))
        real = segments > 0
        assert segments[0] == 1 and (np.diff(segments[real]) >= 0).all()
        assert np.isin(np.diff(segments[real]), [0, 1]).all() and not real[real.sum():].any()
        np.testing.assert_array_equal(targets[:-1], ids[1:])
        # Positions of each piece are rope_index of that piece alone, from (0, 0, 0).
        grids = iter(row["image_grid_thw"][:row["num_images"]])
        for segment in range(1, segments.max() + 1):
            piece = ids[segments == segment]
            piece_grids = np.array([next(grids) for _ in range((piece == start).sum())],
                                   np.int32).reshape(-1, 3)
            alone = rope_index(piece[None], piece_grids, config)[:, 0]
            np.testing.assert_array_equal(row["positions"][:, segments == segment], alone)
            assert (row["positions"][:, segments == segment][:, 0] == 0).all()
        # Loss only where the target is text (or eos) of the same piece.
        same_piece = np.append(segments[1:] == segments[:-1], False) & real
        expected = same_piece & ~np.isin(targets, [start, pad, end])
        np.testing.assert_array_equal(mask, expected.astype(np.float32))
        assert not mask[np.isin(targets, [start, pad, end])].any() and not mask[~real].any()
    # The token after an image (a caption) is learned from it.
    rows = [corpus.row(index) for index in range(corpus.num_rows)]
    after_image = [row["loss_mask"][row["input_ids"] == end] for row in rows]
    assert np.concatenate(after_image).mean() > 0.5


def test_positions_by_hand_for_two_documents_in_a_row(tokenizer, config):
    start, pad, end = vision_ids(config)
    records = [ImageTextRecord(parts=(fake_image(2, 4, 0), "ab"), source="a"), "cd"]
    corpus = pack_mm_corpus(tokenizer, records, config, seq_len=16, max_patches=8)
    row = corpus.row(0)
    ab, cd = tokenizer.encode("ab").ids, tokenizer.encode("cd").ids
    eos = eos_id(tokenizer)
    first = [start, pad, pad, end, *ab, eos]
    assert row["input_ids"][:len(first) + len(cd) + 1].tolist() == first + cd + [eos]
    # The image's 1x2 merged grid sits at (1, 1, 1) and (1, 1, 2); text goes on from 1 + 2.
    t, h, w = row["positions"][:, :len(first)]
    assert t.tolist()[:4] == [0, 1, 1, 3] and w.tolist()[:4] == [0, 1, 2, 3]
    assert h.tolist()[:4] == [0, 1, 1, 3]
    # The second document starts again from 0.
    np.testing.assert_array_equal(row["positions"][:, len(first):len(first) + 2],
                                  [[0, 1], [0, 1], [0, 1]])
    assert row["num_images"] == 1 and row["image_grid_thw"].tolist()[0] == [1, 2, 4]


@pytest.fixture(scope="module")
def mixture(tokenizer, config, texts, digits):
    kw = dict(seq_len=SEQ_LEN, max_patches=MAX_PATCHES)
    return {"text": pack_mm_corpus(tokenizer, texts[:8], config, **kw),
            "digits": pack_mm_corpus(tokenizer, digits, config, **kw)}


def test_resume_from_json_state_gives_the_batches_that_would_have_come(mixture):
    iterator = make_mm_train_iterator(mixture, global_batch_size=4, seed=3)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)
    resumed = make_mm_train_iterator(mixture, global_batch_size=4, seed=3)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)
    batch = expected[0]
    assert {key: (batch[key].shape, batch[key].dtype) for key in MM_ROW_KEYS} == {
        "input_ids": ((4, SEQ_LEN), np.int32), "targets": ((4, SEQ_LEN), np.int32),
        "segment_ids": ((4, SEQ_LEN), np.int32), "positions": ((4, 3, SEQ_LEN), np.int32),
        "loss_mask": ((4, SEQ_LEN), np.float32),
        "pixel_values": ((4, MAX_PATCHES, 1536), np.float32),
        "image_grid_thw": ((4, MAX_PATCHES // 4, 3), np.int32), "num_images": ((4,), np.int32)}


def test_two_hosts_see_disjoint_rows_that_make_up_the_single_host_batches(mixture):
    steps = mixture["digits"].num_rows  # past an epoch of each source
    single = take(make_mm_train_iterator(mixture, global_batch_size=4, seed=3), steps)
    hosts = [take(make_mm_train_iterator(mixture, global_batch_size=4, seed=3, process_index=index,
                                         process_count=2), steps) for index in range(2)]
    assert hosts[0][0]["input_ids"].shape == (2, SEQ_LEN)
    joined = [{key: np.concatenate([a[key], b[key]]) for key in MM_ROW_KEYS}
              for a, b in zip(*hosts)]
    assert_batches_equal(joined, single)
    # Within an epoch the hosts' rows are disjoint and together all rows of the source.
    digits = mixture["digits"]
    iterators = [make_mm_train_iterator({"digits": digits}, global_batch_size=2, seed=0,
                                        process_index=index, process_count=2) for index in range(2)]
    # Rows are told apart by their pixels (captions repeat: the digits come in order 0..9 again).
    seen = [{row.tobytes() for batch in take(iterator, digits.num_rows // 2)
             for row in batch["pixel_values"]} for iterator in iterators]
    assert not seen[0] & seen[1]
    everything = {digits.row(index)["pixel_values"].tobytes() for index in range(digits.num_rows)}
    assert seen[0] | seen[1] == everything


@pytest.mark.parametrize("weights, image_share", [({"text": 3, "digits": 1}, 0.25),
                                                  ({"text": 1, "digits": 4}, 0.8)])
def test_mixture_weights_are_the_shares_of_rows(mixture, weights, image_share):
    iterator = make_mm_train_iterator(mixture, global_batch_size=8, seed=0, weights=weights)
    has_images = np.concatenate([batch["num_images"] > 0 for batch in take(iterator, 25)])
    assert abs(has_images.mean() - image_share) < 0.05


def test_worker_processes_give_the_same_batches_and_a_portable_state(mixture):
    expected = take(make_mm_train_iterator(mixture, global_batch_size=4, seed=1), 4)
    with_worker = make_mm_train_iterator(mixture, global_batch_size=4, seed=1, worker_count=1)
    assert_batches_equal(take(with_worker, 2), expected[:2])
    state = json.loads(json.dumps(with_worker.get_state()))
    with_worker.close()
    in_process = make_mm_train_iterator(mixture, global_batch_size=4, seed=1)
    in_process.set_state(state)
    assert_batches_equal(take(in_process, 2), expected[2:])


def test_bad_records_are_skipped_and_counted(tokenizer, config, digits):
    good = [digits[0], "Plain text is a document too.", digits[1]]
    huge = ImageTextRecord(parts=("big", fake_image(16, 16, 0)), source="huge")  # 64 + 2 tokens
    crowded = ImageTextRecord(parts=("many", *[fake_image(4, 4, i) for i in range(5)]), source="m")
    scattered = ImageTextRecord(parts=("tiny", *[fake_image(2, 2, i) for i in range(3)]),
                                source="s")
    documents = [None, good[0], "", "  \n", "lone surrogate \ud800", huge, good[1], crowded,
                 "a literal " + VISION_TOKENS["image_token_id"], scattered, good[2]]
    corpus = pack_mm_corpus(tokenizer, documents, config, seq_len=SEQ_LEN, max_patches=MAX_PATCHES,
                            max_images=2)
    assert corpus.skipped == {"empty": 2, "encode_error": 1, "image_too_long": 1, "not_text": 1,
                              "too_many_images": 1, "too_many_patches": 1,
                              "vision_token_in_text": 1}
    clean = pack_mm_corpus(tokenizer, good, config, seq_len=SEQ_LEN, max_patches=MAX_PATCHES,
                           max_images=2)
    assert_batches_equal([corpus.row(i) for i in range(corpus.num_rows)],
                         [clean.row(i) for i in range(clean.num_rows)])
    with pytest.raises(ValueError, match="no usable documents among 2"):
        pack_mm_corpus(tokenizer, ["", None], config, seq_len=SEQ_LEN, max_patches=MAX_PATCHES)
    # Strict mode stops at the first bad document, naming where it came from and why.
    for bad, message in ((documents[:3], "document 0: not_text"),
                         (good + [huge], "huge: image_too_long"),
                         (good + [crowded], "m: too_many_patches")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            pack_mm_corpus(tokenizer, bad, config, seq_len=SEQ_LEN, max_patches=MAX_PATCHES,
                           max_images=2, strict=True)


def test_sources_must_share_row_shapes_and_weights_must_name_them(mixture, tokenizer, config,
                                                                  texts):
    other = pack_mm_corpus(tokenizer, texts[:2], config, seq_len=SEQ_LEN, max_patches=32)
    with pytest.raises(ValueError, match="sources differ in"):
        make_mm_train_iterator({"a": mixture["text"], "b": other}, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="one per source"):
        make_mm_train_iterator(mixture, global_batch_size=2, seed=0, weights={"text": 1})


def test_vision_tokens_and_hf_tokenizer_loading(tmp_path, tokenizer, config, texts):
    ids = {field: getattr(config, field) for field in VISION_TOKENS}
    assert add_vision_tokens(tokenizer) == ids
    assert tokenizer.get_vocab_size() == config.vocab_size  # adding again adds nothing
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_str())
    assert load_hf_tokenizer(tmp_path).to_str() == tokenizer.to_str()
    with pytest.raises(FileNotFoundError, match="needs a tokenizer.json"):
        load_hf_tokenizer(tmp_path / "missing")
    shifted = config.replace(image_token_id=5)
    with pytest.raises(ValueError, match=r"<\|image_pad\|> = \d+ but model.image_token_id is 5"):
        pack_mm_corpus(tokenizer, texts[:1], shifted, seq_len=SEQ_LEN, max_patches=MAX_PATCHES)


def test_vision_tower_on_a_padded_batch_gives_each_image_token_its_features(corpus, config):
    batch = {key: np.stack([corpus.row(i)[key] for i in range(4)]) for key in MM_ROW_KEYS}
    assert 0 < batch["num_images"].sum() and (batch["num_images"] < MAX_PATCHES // 4).all()
    tower = VisionModel(TINY_TOWER, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))

    @nnx.jit
    def fuse(tower, input_ids, pixel_values, image_grid_thw):
        pixels, grid = vision_tower_inputs(pixel_values, image_grid_thw)
        hidden = jax.numpy.zeros((*input_ids.shape, TINY_TOWER.out_hidden_size))
        return scatter_features(hidden, input_ids, config.image_token_id, tower(pixels, grid),
                                "image")

    fused = fuse(tower, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    # numpy gives what jax gives; the filler covers exactly the padding patches.
    pixels, grid = vision_tower_inputs(batch["pixel_values"], batch["image_grid_thw"])
    as_jax = vision_tower_inputs(*map(jax.numpy.asarray, (batch["pixel_values"],
                                                          batch["image_grid_thw"])))
    np.testing.assert_array_equal(pixels, as_jax[0])
    np.testing.assert_array_equal(grid, as_jax[1])
    assert np.prod(grid, axis=1).sum() == 4 * MAX_PATCHES and grid[-1, 1] == 2
    # The reference: the tower on the real images only, no padding, grids known (HF's layout).
    grids = np.concatenate([batch["image_grid_thw"][row, :count]
                            for row, count in enumerate(batch["num_images"])])
    pixels = np.concatenate([batch["pixel_values"][row, :int(np.prod(grid, axis=1).sum())]
                             for row, grid in enumerate(np.split(grids, np.cumsum(
                                 batch["num_images"])[:-1]))])
    np.testing.assert_allclose(np.asarray(fused)[batch["input_ids"] == config.image_token_id],
                               np.asarray(nnx.jit(VisionModel.__call__)(tower, pixels, grids)),
                               atol=1e-5)
