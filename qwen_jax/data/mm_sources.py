"""Image- and video-text documents: JSONL and ArrayRecord readers that skip and count bad records;
offline digits and photos.

A document (`ImageTextRecord`) is text segments and preprocessed images and videos in reading
order. The packing step tokenises the text and puts each image's and video's placeholder block
where it stands (mm_packing).

JSONL schema, one document per line; image and video paths are relative to the JSONL file's folder
(or absolute). Two forms:

    {"text": "A cat on a mat.", "images": ["cat.png"]}   images first, then the text (a caption)
    {"parts": [{"text": "See:"}, {"image": "a.png"}, {"text": "and"}, {"video": "b.mp4"}]}

A video is a file PyAV decodes (mp4, webm, gif, ...) or a directory of frame images (sorted by
name); {"video": "frames/", "fps": 4} gives a directory's frame rate (default 24) or overrides a
file's.

An ArrayRecord file holds the same JSON objects, one per record (UTF-8 bytes); there an image may
also be the encoded file itself, {"image_bytes": "<base64 of the PNG/JPEG bytes>"}, so a shard
needs no folder beside it (`write_image_text_array_record` writes either form).

A bad record is skipped whole (its text may refer to the missing image) and counted under one
reason of `SKIP_REASONS`, the first found; with strict=True the first one raises instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_jax.data.images import ImageError, ImageProcessorConfig, ProcessedImage, preprocess_image
from qwen_jax.data.records import Skip, array_records, jsonl_records, parse_records
from qwen_jax.data.videos import ProcessedVideo, VideoProcessorConfig, load_video

SKIP_REASONS = {
    "bad_json": "the line is not a UTF-8 JSON object",
    "missing_field": "no 'parts' and no 'text', or a part with no 'text', 'image', 'image_bytes' "
                     "or 'video'",
    "bad_field": "a field of the wrong type (or bad base64, or an fps not above 0), or a part of "
                 "two kinds at once",
    "empty_document": "no text but whitespace: nothing to learn from",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file does not decode",
    "image_too_large": "an image over PIL's decompression-bomb limit",
    "image_too_small": "an image side shorter than min_image_side",
    "extreme_aspect_ratio": "an image longer than 200:1",
    "unsupported_mode": "an image mode PIL cannot convert to RGB",
    "missing_video": "a video file or frame directory does not exist",
    "corrupt_video": "a video file or one of its sampled frames does not decode",
    "empty_video": "a video without frames",
    "video_too_short": "a video of fewer frames than one temporal patch",
    "frame_size_mismatch": "a video whose frames differ in size",
}
# Smaller images are icons and spacer pixels: upscaled to the pixel budget they teach nothing.
MIN_IMAGE_SIDE = 16
DIGIT_UPSCALE = 8  # 8x8 -> 64x64 pixels: with a 64*64 budget, 4x4 patches = 4 image tokens


@dataclasses.dataclass(frozen=True)
class ImageTextRecord:
    """One document: text segments (str), images and videos in reading order; `source` says where
    from."""

    parts: tuple[str | ProcessedImage | ProcessedVideo, ...]
    source: str  # "file.jsonl:12" or "sklearn digits[3]", for messages

    @property
    def images(self) -> list[ProcessedImage]:
        """The images in order: their pixel_values concatenate to the model's pixel_values."""
        return [part for part in self.parts if isinstance(part, ProcessedImage)]

    @property
    def videos(self) -> list[ProcessedVideo]:
        """The videos in order (pixel_values_videos)."""
        return [part for part in self.parts if isinstance(part, ProcessedVideo)]


PART_KINDS = ("text", "image", "image_bytes", "video")


def _kind_and_value(part) -> tuple[str, str]:
    """(kind, str) of one {"text": ...} / {"image": path} / {"image_bytes": base64} /
    {"video": path} part (a video's fps is read by `_load_video`)."""
    if not isinstance(part, dict):
        raise Skip("bad_field", f"a part is {type(part).__name__}, not an object")
    kinds = [kind for kind in PART_KINDS if kind in part]
    if not kinds:
        raise Skip("missing_field", f"a part has none of {list(PART_KINDS)}: {sorted(part)}")
    if len(kinds) > 1:
        raise Skip("bad_field", f"a part has {' and '.join(map(repr, kinds))}")
    kind = kinds[0]
    if not isinstance(part[kind], str):
        raise Skip("bad_field", f"'{kind}' is {type(part[kind]).__name__}, not a string")
    return kind, part[kind]


def _parts_of(document) -> list[tuple[str, str, dict]]:
    """(kind, value, the part's object) of a decoded JSON line's parts, in reading order."""
    if not isinstance(document, dict):
        raise Skip("bad_json", f"the line is a JSON {type(document).__name__}, not an object")
    if "parts" in document:
        if not isinstance(document["parts"], list):
            raise Skip("bad_field", "'parts' is not a list")
        return [(*_kind_and_value(part), part) for part in document["parts"]]
    if "text" not in document:
        raise Skip("missing_field", f"neither 'parts' nor 'text' among {sorted(document)}")
    images = document.get("images", [])
    if not isinstance(images, list):
        raise Skip("bad_field", "'images' is not a list")
    return [(*_kind_and_value({"image": path}), {}) for path in images] + [
        (*_kind_and_value({"text": document["text"]}), {})]


def _image_file(kind: str, value: str, folder: Path) -> tuple[Path | io.BytesIO, str]:
    """An image part -> (what PIL opens, its name in messages); raise Skip if it cannot exist."""
    if kind == "image":
        path = folder / value
        if not path.is_file():
            raise Skip("missing_image", f"{path} does not exist")
        return path, str(path)
    try:
        return io.BytesIO(base64.b64decode(value, validate=True)), "image_bytes"
    except binascii.Error as error:
        raise Skip("bad_field", f"'image_bytes' is not base64: {error}") from None


def _load_image(kind: str, value: str, folder: Path, config: ImageProcessorConfig,
                min_image_side: int) -> ProcessedImage:
    """Decode and preprocess one image (a file or its bytes), or raise Skip with the reason."""
    file, name = _image_file(kind, value, folder)
    try:
        with Image.open(file) as image:
            image.load()  # decode now: a truncated file only fails here
    except Image.DecompressionBombError as error:
        raise Skip("image_too_large", f"{name}: {error}") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...: any file may
        raise Skip("corrupt_image", f"{name}: {type(error).__name__}: {error}") from None
    if min(image.size) < min_image_side:
        raise Skip("image_too_small", f"{name} is {image.width}x{image.height} pixels, a side is "
                    f"below min_image_side={min_image_side}")
    try:
        return preprocess_image(image, config, name=name)
    except ImageError as error:
        raise Skip(error.reason, str(error)) from None


def _load_video(part: dict, folder: Path, config: VideoProcessorConfig) -> ProcessedVideo:
    """Decode and preprocess one video part (a file or a frame directory), or raise Skip."""
    fps = part.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0):
        raise Skip("bad_field", f"'fps' is {fps!r}, not a number above 0")
    try:
        return load_video(folder / part["video"], config, fps=fps)
    except ImageError as error:  # VideoError: missing, corrupt, too short, ...
        raise Skip(error.reason, str(error)) from None


def parse_media_record(line: bytes, folder: Path, config: ImageProcessorConfig,
                       video_config: VideoProcessorConfig, min_image_side: int,
                       where: str) -> ImageTextRecord:
    """One JSON object (a JSONL line or an ArrayRecord record) -> a record with its images and
    videos preprocessed, or raise Skip."""
    try:
        document = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Skip("bad_json", str(error)) from None
    parts = _parts_of(document)
    # Checked before any image is read: an empty document is skipped without decoding its images.
    if not any(kind == "text" and value.strip() for kind, value, _ in parts):
        raise Skip("empty_document", "no text but whitespace")

    return ImageTextRecord(parts=tuple(_load_part(*part, folder, config, video_config, min_image_side)
                                       for part in parts), source=where)


def _load_part(kind: str, value: str, part: dict, folder: Path, config: ImageProcessorConfig,
               video_config: VideoProcessorConfig, min_image_side: int):
    """A text part's text, or an image or video part decoded and preprocessed; raise Skip."""
    if kind == "text":
        return value
    if kind == "video":
        return _load_video(part, folder, video_config)
    return _load_image(kind, value, folder, config, min_image_side)


def load_part(part, folder: Path, config: ImageProcessorConfig, video_config: VideoProcessorConfig,
              min_image_side: int = MIN_IMAGE_SIDE) -> str | ProcessedImage | ProcessedVideo:
    """One {"text"} / {"image"} / {"image_bytes"} / {"video"} part (other keys, e.g. a chat part's
    "type", are left alone): its text, or its image or video preprocessed; raise Skip."""
    return _load_part(*_kind_and_value(part), part, folder, config, video_config, min_image_side)


def load_image_text_jsonl(path: str | Path, config: ImageProcessorConfig, *, strict: bool = False,
                          min_image_side: int = MIN_IMAGE_SIDE,
                          video_config: VideoProcessorConfig = VideoProcessorConfig()
                          ) -> tuple[list[ImageTextRecord], dict[str, int]]:
    """The usable documents of a JSONL file in file order, and counts of the skipped ones by reason.

    Every image and video is preprocessed and held in memory (24 bytes per resized pixel and
    temporal patch): right for demos and small fine-tuning sets. strict=True raises
    ValueError("<file>:<line>: <reason>: ...") on the first bad record instead of skipping it.
    """
    return _load(Path(path), jsonl_records, config, video_config, strict, min_image_side)


def load_image_text_array_record(path: str | Path, config: ImageProcessorConfig, *,
                                 strict: bool = False, min_image_side: int = MIN_IMAGE_SIDE,
                                 video_config: VideoProcessorConfig = VideoProcessorConfig()
                                 ) -> tuple[list[ImageTextRecord], dict[str, int]]:
    """As `load_image_text_jsonl`, for an ArrayRecord file of JSON records ("<file>[<index>]" in
    messages); image and video paths are relative to the file's folder."""
    return _load(Path(path), array_records, config, video_config, strict, min_image_side)


def _load(path: Path, read, config: ImageProcessorConfig, video_config: VideoProcessorConfig, strict: bool,
          min_image_side: int) -> tuple[list[ImageTextRecord], dict[str, int]]:
    """The usable records of the file `read` reads (media paths relative to its folder), and skip counts."""
    def parse(line, where):
        return parse_media_record(line, path.parent, config, video_config, min_image_side, where)
    return parse_records(read(path), parse, strict)


def write_image_text_array_record(path: str | Path, documents: list[dict]) -> None:
    """Write JSON documents (the schema above) as an ArrayRecord file, one record each."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for document in documents:
            writer.write(json.dumps(document).encode("utf-8"))
    finally:
        writer.close()


def _digit_image(ink: np.ndarray, upscale: int) -> np.ndarray:
    """ink [8, 8] in 0..16 -> grey uint8 [8 * upscale, 8 * upscale], each cell a flat square."""
    grey = np.rint(ink * (255 / 16)).astype(np.uint8)
    # Nearest-neighbour keeps the strokes as written; a resize to the budget may smooth them.
    return grey.repeat(upscale, axis=0).repeat(upscale, axis=1)


def digits_image_text_records(config: ImageProcessorConfig, *, upscale: int = DIGIT_UPSCALE,
                              limit: int | None = None) -> list[ImageTextRecord]:
    """scikit-learn's 1,797 handwritten digits, each as (image, "A handwritten digit 7.").

    Real handwriting (the test set of UCI's optical digits, 13 writers) shipped inside
    scikit-learn as 8x8 cells counting ink (0..16), so demos and tests need no download. Images
    are white ink on black, upscaled by `upscale` before preprocessing; `limit` keeps the first.
    """
    from sklearn.datasets import load_digits  # here, not at the top: sklearn is slow to import

    digits = load_digits()
    return [ImageTextRecord(parts=(preprocess_image(_digit_image(ink, upscale), config,
                                                    name=f"digits[{index}]"),
                                   f"A handwritten digit {label}."),
                            source=f"sklearn digits[{index}]")
            for index, (ink, label) in enumerate(zip(digits.images[:limit], digits.target[:limit]))]


# scikit-learn's two sample photos (its `load_sample_images`), with what they show.
PHOTO_CAPTIONS = {"china.jpg": "A photo of a Chinese temple among trees.",
                  "flower.jpg": "A photo of an orange flower."}


def sample_photo_records(config: ImageProcessorConfig) -> list[ImageTextRecord]:
    """The two 427x640 colour photos that ship inside scikit-learn, each with a caption."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return [ImageTextRecord(parts=(preprocess_image(pixels, config, name=name),
                                   PHOTO_CAPTIONS[name]),
                            source=f"sklearn sample_images/{name}")
            for pixels, name in zip(photos.images, (Path(f).name for f in photos.filenames))]
