"""Image-text sources: JSONL and ArrayRecord bad records are skipped and counted (strict: named);
the digits and the sample photos."""

import base64
import json

import numpy as np
import pytest
from PIL import Image

from qwen_jax.data.images import ImageProcessorConfig, ProcessedImage, preprocess_image
from qwen_jax.data.mm_sources import (
    SKIP_REASONS,
    digits_image_text_records,
    load_image_text_array_record,
    load_image_text_jsonl,
    sample_photo_records,
    write_image_text_array_record,
)

TINY = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)

GOOD_LINES = [
    {"text": "A red square.", "images": ["red.png"]},
    {"parts": [{"text": "Left:"}, {"image": "red.png"}, {"text": "right:"},
               {"image": "noise.jpg"}, {"text": "the end."}]},
    {"text": "Text alone is a document too."},
]
# One bad line per skip reason (the reason is what the reader must count it under).
BAD_LINES = {
    "bad_json": ['{"text": "unterminated', "[1, 2]", b'{"text": "caf\xe9"}'],
    "missing_field": [{"images": ["red.png"]}, {"parts": [{"img": "red.png"}]}],
    "bad_field": [{"text": 5}, {"text": "x", "images": "red.png"}, {"parts": "red.png"},
                  {"parts": [{"text": "x", "image": "red.png"}]}],
    "empty_document": [{"text": "  \n", "images": ["red.png"]}, {"parts": [{"image": "red.png"}]}],
    "missing_image": [{"text": "A ghost.", "images": ["ghost.png"]}],
    "corrupt_image": [{"text": "Noise.", "images": ["garbage.png"]},
                      {"parts": [{"text": "Cut off:"}, {"image": "truncated.jpg"}]}],
    "image_too_small": [{"text": "An icon.", "images": ["icon.png"]}],
    "extreme_aspect_ratio": [{"text": "A strip.", "images": ["strip.png"]}],
}


def as_line(record):
    return record if isinstance(record, bytes) else (
        record if isinstance(record, str) else json.dumps(record)).encode()


@pytest.fixture()
def folder(tmp_path):
    """Images beside the JSONL: good ones, a corrupt, a truncated, a tiny and a thin one."""
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    noise = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.jpg", quality=95)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    jpeg = (tmp_path / "noise.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    Image.new("RGB", (8, 8)).save(tmp_path / "icon.png")
    Image.new("RGB", (4000, 16)).save(tmp_path / "strip.png")  # 250:1
    return tmp_path


def write_jsonl(path, records):
    path.write_bytes(b"".join(as_line(record) + b"\n" for record in records))
    return path


def test_good_records_keep_reading_order_and_bad_ones_are_counted_per_reason(folder):
    bad = [line for lines in BAD_LINES.values() for line in lines]
    # Good and bad interleaved, plus blank lines, which are no records at all.
    lines = [GOOD_LINES[0], *bad[:7], GOOD_LINES[1], b"", *bad[7:], GOOD_LINES[2], b"  "]
    records, skipped = load_image_text_jsonl(write_jsonl(folder / "data.jsonl", lines), TINY)

    assert skipped == {reason: len(lines) for reason, lines in BAD_LINES.items()}
    assert set(skipped) <= set(SKIP_REASONS)
    assert [record.source for record in records] == [
        f"{folder / 'data.jsonl'}:{number}" for number in (1, 9, 20)]

    caption, interleaved, text_only = records
    assert [type(part) for part in caption.parts] == [ProcessedImage, str]  # image, then caption
    assert caption.parts[1] == "A red square."
    assert [part if isinstance(part, str) else part.grid_thw for part in interleaved.parts] == [
        # 48x64 -> 64x64 (1.5 rounds to 2); 80x100 is over 64*64 pixels -> 32x64.
        "Left:", (1, 4, 4), "right:", (1, 2, 4), "the end."]
    assert text_only.parts == ("Text alone is a document too.",) and text_only.images == []

    # The images are the files preprocessed with the given budget; paths are relative to the JSONL.
    with Image.open(folder / "red.png") as image:
        red = preprocess_image(image, TINY)
    np.testing.assert_array_equal(caption.images[0].pixel_values, red.pixel_values)
    np.testing.assert_array_equal(interleaved.images[0].pixel_values, red.pixel_values)


@pytest.mark.parametrize("reason, line",
                         [(reason, lines[0]) for reason, lines in BAD_LINES.items()])
def test_strict_mode_raises_on_the_first_bad_record_naming_file_line_and_reason(folder, reason,
                                                                                line):
    path = write_jsonl(folder / "strict.jsonl", [GOOD_LINES[0], line, GOOD_LINES[2]])
    with pytest.raises(ValueError, match=rf"strict\.jsonl:2: {reason}: ") as caught:
        load_image_text_jsonl(path, TINY, strict=True)
    if reason in ("missing_image", "corrupt_image", "image_too_small", "extreme_aspect_ratio"):
        assert str(folder / line["images"][0]) in str(caught.value)  # and the image file
    # The same file without strict mode loses only that record.
    records, skipped = load_image_text_jsonl(path, TINY)
    assert len(records) == 2 and skipped == {reason: 1}


def test_absolute_image_paths_and_a_custom_minimum_side(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = write_jsonl(elsewhere / "data.jsonl", [
        {"text": "An icon.", "images": [str(folder / "icon.png")]},
        {"text": "A red square.", "images": [str(folder / "red.png")]}])
    _, skipped = load_image_text_jsonl(path, TINY)
    assert skipped == {"image_too_small": 1}
    records, skipped = load_image_text_jsonl(path, TINY, min_image_side=8)
    assert len(records) == 2 and skipped == {}
    assert records[0].images[0].grid_thw == (1, 2, 2)  # 8x8 upscaled to the 32*32 minimum


def test_a_missing_jsonl_file_is_an_error_not_a_skip(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_image_text_jsonl(tmp_path / "nowhere.jsonl", TINY)


def test_digits_are_real_images_with_their_labels_as_captions():
    from sklearn.datasets import load_digits

    digits = load_digits()
    records = digits_image_text_records(TINY, limit=20)
    assert len(records) == 20
    for index, record in enumerate(records):
        image, caption = record.parts
        assert caption == f"A handwritten digit {digits.target[index]}."
        assert record.source == f"sklearn digits[{index}]"
        assert image.grid_thw == (1, 4, 4) and image.pixel_values.shape == (16, 1536)
        # Undo the patch order (rows (block row, block col, 2, 2), columns (C, frame, y, x)):
        # every 8x8 cell of the 64x64 red channel is the digit's ink, scaled to [-1, 1].
        patches = image.pixel_values.reshape(2, 2, 2, 2, 3, 2, 16, 16)
        red = patches[..., 0, 0, :, :].transpose(0, 2, 4, 1, 3, 5).reshape(64, 64)
        cells = red.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(8, 8, 64)
        assert np.all(cells == cells[..., :1])  # flat cells: no resize ran (64x64 fits 64*64)
        ink = np.rint(digits.images[index] * 255 / 16) / 255 * 2 - 1
        np.testing.assert_allclose(cells[..., 0], ink, atol=1e-6)
    # Real handwriting: no two of the first 20 digits are the same picture.
    assert len({record.parts[0].pixel_values.tobytes() for record in records}) == 20


def test_all_digits_load_with_the_default_upscale():
    records = digits_image_text_records(TINY)
    assert len(records) == 1797
    assert {record.parts[1] for record in records} == {
        f"A handwritten digit {label}." for label in range(10)}


def test_array_record_holds_paths_or_the_image_bytes_and_counts_bad_records(folder):
    red_bytes = base64.b64encode((folder / "red.png").read_bytes()).decode()
    garbage = base64.b64encode(b"not an image").decode()
    documents = [GOOD_LINES[1],
                 {"parts": [{"text": "Inline:"}, {"image_bytes": red_bytes}]},
                 {"parts": [{"image_bytes": "%%% not base64"}, {"text": "x"}]},
                 {"parts": [{"image_bytes": garbage}, {"text": "x"}]},
                 {"parts": [{"image": "red.png", "image_bytes": red_bytes}]},
                 BAD_LINES["missing_image"][0]]
    path = folder / "data.array_record"
    write_image_text_array_record(path, documents)
    records, skipped = load_image_text_array_record(path, TINY)

    assert skipped == {"bad_field": 2, "corrupt_image": 1, "missing_image": 1}
    assert [record.source for record in records] == [f"{path}[0]", f"{path}[1]"]
    # The same documents read from JSONL give the same records; inline bytes equal the file.
    from_jsonl, _ = load_image_text_jsonl(write_jsonl(folder / "same.jsonl", documents[:1]), TINY)
    for got, want in zip(records[0].images, from_jsonl[0].images):
        np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
    np.testing.assert_array_equal(records[1].images[0].pixel_values, records[0].images[0].pixel_values)
    with pytest.raises(ValueError, match=r"data\.array_record\[2\]: bad_field: 'image_bytes' is not base64"):
        load_image_text_array_record(path, TINY, strict=True)
    with pytest.raises(FileNotFoundError, match="nowhere.array_record"):
        load_image_text_array_record(folder / "nowhere.array_record", TINY)


def test_sample_photos_are_the_two_sklearn_photos_resized_into_the_budget():
    records = sample_photo_records(TINY)
    assert [record.source for record in records] == ["sklearn sample_images/china.jpg",
                                                     "sklearn sample_images/flower.jpg"]
    for record in records:
        image, caption = record.parts
        assert caption.startswith("A photo of")
        assert image.grid_thw == (1, 2, 4)  # 427x640 into 64*64 pixels: 32x64
        assert image.pixel_values.std() > 0.1  # a real picture, not a flat fill
