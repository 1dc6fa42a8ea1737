"""The default clip set, offline: short videos made from the images that ship in scikit-learn.

Two kinds, each with a caption that names what moves and how, so a model must read the frames in
order to predict it:
- moving digits: a real handwritten digit (sklearn's 8x8 digits, upscaled) crosses a dark frame
  left to right, right to left, top to bottom or bottom to top;
- camera moves over sklearn's two photos: a window that pans across the photo or zooms in or out,
  resampled to a fixed frame size, as a camera would film it.
The frames are made at CLIP_FPS and go through `preprocess_video` (frame sampling, timestamps,
resizing) like any decoded video.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from qwen_jax.data.mm_sources import PHOTO_CAPTIONS, ImageTextRecord
from qwen_jax.data.videos import VideoProcessorConfig, preprocess_video

CLIP_FPS = 4.0
CLIP_FRAMES = 8  # two seconds
DIGIT_CANVAS = 64  # pixels; the digit is half as wide
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
CAMERA_MOVES = ("pans right", "pans left", "zooms in", "zooms out")


def digit_clip(ink: np.ndarray, direction: str, *, frames: int = CLIP_FRAMES,
               canvas: int = DIGIT_CANVAS) -> np.ndarray:
    """ink [8, 8] in 0..16 -> uint8 [frames, canvas, canvas] (grey): the digit crossing the frame
    in `direction`, centred across it."""
    size = canvas // 2
    digit = np.rint(ink * (255 / 16)).astype(np.uint8).repeat(size // 8, 0).repeat(size // 8, 1)
    travel = np.rint(np.linspace(0, canvas - size, frames)).astype(int)
    if direction in ("right to left", "bottom to top"):
        travel = travel[::-1]
    clip = np.zeros((frames, canvas, canvas), np.uint8)
    middle = (canvas - size) // 2
    for frame, offset in zip(clip, travel):
        row, col = (middle, offset) if direction in DIRECTIONS[:2] else (offset, middle)
        frame[row:row + size, col:col + size] = digit
    return clip


def moving_digit_records(config: VideoProcessorConfig, *, limit: int = 400) -> list[ImageTextRecord]:
    """The first `limit` sklearn digits, each crossing the frame in one of four directions (in
    turn), captioned "A handwritten digit 7 moves left to right."."""
    from sklearn.datasets import load_digits  # here, not at the top: sklearn is slow to import

    digits = load_digits()
    records = []
    for index, (ink, label) in enumerate(zip(digits.images[:limit], digits.target[:limit])):
        direction = DIRECTIONS[index % len(DIRECTIONS)]
        name = f"moving digits[{index}]"
        video = preprocess_video(digit_clip(ink, direction), CLIP_FPS, config, name=name)
        records.append(ImageTextRecord(
            parts=(video, f"A handwritten digit {label} moves {direction}."), source=name))
    return records


def camera_clip(photo: np.ndarray, move: str, *, frames: int = CLIP_FRAMES,
                size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """photo uint8 [H, W, 3] -> uint8 [frames, *size, 3]: a window of the photo's height (3/4 of
    it for pans) that slides across it, or shrinks to half its size about the centre (zoom in)
    or grows from there (zoom out), each frame resampled to `size` (height, width)."""
    height, width = photo.shape[:2]
    aspect = size[1] / size[0]
    steps = np.linspace(0, 1, frames)
    if move.startswith("pans"):
        h = int(height * 3 / 4)
        w = min(width, int(h * aspect))
        lefts = steps * (width - w) if move == "pans right" else (1 - steps) * (width - w)
        boxes = [(left, (height - h) / 2, left + w, (height + h) / 2) for left in lefts]
    else:
        scales = 1 - steps / 2 if move == "zooms in" else 0.5 + steps / 2
        full_h = min(height, width / aspect)
        boxes = [(width / 2 - s * full_h * aspect / 2, height / 2 - s * full_h / 2,
                  width / 2 + s * full_h * aspect / 2, height / 2 + s * full_h / 2) for s in scales]
    image = Image.fromarray(photo)
    return np.stack([np.asarray(image.resize(size[::-1], Image.Resampling.BICUBIC, box=box))
                     for box in boxes])


def camera_move_records(config: VideoProcessorConfig) -> list[ImageTextRecord]:
    """sklearn's two photos, each filmed with every camera move, captioned "The camera pans right
    across a photo of an orange flower."."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    records = []
    for pixels, filename in zip(photos.images, photos.filenames):
        name = filename.rsplit("/", 1)[-1]
        what = PHOTO_CAPTIONS[name].removeprefix("A photo of ").rstrip(".")
        for move in CAMERA_MOVES:
            source = f"camera {move} over sklearn sample_images/{name}"
            video = preprocess_video(camera_clip(pixels, move), CLIP_FPS, config, name=source)
            across = "across" if move.startswith("pans") else "on"
            records.append(ImageTextRecord(
                parts=(video, f"The camera {move} {across} a photo of {what}."), source=source))
    return records
