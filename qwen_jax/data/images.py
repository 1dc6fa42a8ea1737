"""Images for the vision tower: resize to the pixel budget, normalise, patchify (numpy).

Behaves like Hugging Face's `Qwen2VLImageProcessorPil` with Qwen3.5's `preprocessor_config.json`
(patch 16, temporal patch 2, merge 2, mean = std = 0.5, 65,536 to 16,777,216 pixels): the same
sizes, and bit-identical `pixel_values` for the same input (tests/test_images.py checks both).

Resampling: PIL bicubic on the uint8 RGB image, as HF's PIL ("slow") processor does (its default
`resample`), so this module needs no torch. HF's torchvision ("fast") processor, the one Qwen3.5's
config names, resizes bicubic with torch's antialiased kernel (close to PIL's, not the same code)
and normalises as (x - 127.5) / 127.5: up to 6e-8 away from HF's slow arithmetic kept here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

MAX_ASPECT_RATIO = 200  # HF's limit: a longer strip is one merge block stretched along its length


class ImageError(ValueError):
    """An image that cannot be preprocessed; `reason` names the problem for skip counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become patches: HF `preprocessor_config.json` fields, Qwen3.5's values by default.

    min_pixels and max_pixels bound H * W after resizing (HF's size.shortest_edge / longest_edge);
    tiny demo models want a small budget, e.g. min_pixels=32*32, max_pixels=64*64.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        check_processor_fields(self)

    @property
    def factor(self) -> int:
        """Resized H and W are multiples of this: one 2x2 merge block of patches."""
        return self.patch_size * self.merge_size


def check_processor_fields(config) -> None:
    """The fields an image and a video processor config share: sizes >= 1, a pixel range, RGB
    mean and std."""
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_pixels < config.min_pixels:
        raise ValueError(f"max_pixels ({config.max_pixels}) is below min_pixels "
                         f"({config.min_pixels})")
    if len(config.image_mean) != 3 or len(config.image_std) != 3:
        raise ValueError(f"image_mean and image_std need 3 values (RGB), got "
                         f"{config.image_mean} and {config.image_std}")


class ProcessedImage(NamedTuple):
    """pixel_values float32 [t*h*w, 3*temporal*patch*patch], grid_thw (t, h, w) in patches."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]


def smart_resize(height: int, width: int, *, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(h, w), multiples of `factor`, near the aspect ratio, with min_pixels <= h*w <= max_pixels.

    HF's rule exactly: round each side to the nearest multiple (Python's round, so halves go to
    the even multiple); if that is over budget, shrink both sides by the one ratio that fits and
    floor; if under, grow them and ceil. Raises ImageError for an empty image or one over 200:1.
    """
    if height < 1 or width < 1:
        raise ImageError("image_too_small", f"a {height}x{width} image has no pixels to patchify")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError("extreme_aspect_ratio",
                         f"a {height}x{width} image is longer than {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def as_pil(image: np.ndarray | Image.Image, name: str) -> Image.Image:
    """A PIL image from a PIL image or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageError("bad_dtype", f"{name}: expected uint8 pixels, got {array.dtype}")
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if array.ndim == 3 and array.shape[2] in modes:
        channels = array.shape[2]
        return Image.fromarray(array if channels > 1 else array[:, :, 0], modes[channels])
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    raise ImageError("bad_channels", f"{name}: expected an image [H, W, 3] (RGB), [H, W, 4] "
                     f"(RGBA) or [H, W] (grey), got shape {array.shape}")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """RGB, compositing any transparency onto white as HF does (alpha is not simply dropped)."""
    try:
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:  # PIL has no conversion for a few rare modes (e.g. "La")
        raise ImageError("unsupported_mode", f"{name}: mode {image.mode}: {error}") from None


def resize_and_normalise(image: Image.Image, height: int, width: int, config, name: str) -> np.ndarray:
    """A PIL image -> float32 [3, height, width]: RGB, bicubic resize, rescale, normalise.

    config: an ImageProcessorConfig or a VideoProcessorConfig (image_mean, image_std).
    """
    rgb = _to_rgb(image, name).resize((width, height), Image.Resampling.BICUBIC)
    # HF's arithmetic and dtypes (scale in float64, then float32) so the values are bit-identical.
    pixels = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = ((pixels - np.asarray(config.image_mean, np.float32))
              / np.asarray(config.image_std, np.float32))
    return pixels.transpose(2, 0, 1)


def patchify_frames(frames: np.ndarray, config) -> np.ndarray:
    """frames [T, C, H, W] -> rows [T/tp * H/p * W/p, C*tp*p*p], ordered (t, h/m, w/m, m, m).

    config: an ImageProcessorConfig or a VideoProcessorConfig (patch, temporal patch, merge sizes).

    Each 2x2 merge block's patches are consecutive rows (the merger groups 4 rows into one
    token); a row is flattened as (channel, frame within the temporal patch, y, x), the layout of
    the patch embedding's Conv3d kernel [C, tp, p, p].
    """
    num_frames, channels, height, width = frames.shape
    p, tp, m = config.patch_size, config.temporal_patch_size, config.merge_size
    if num_frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"frames {frames.shape} do not tile into temporal patches of {tp} and "
                         f"merge blocks of {p * m}x{p * m} pixels")
    blocks = frames.reshape(num_frames // tp, tp, channels, height // (p * m), m, p,
                            width // (p * m), m, p)
    # -> (t, block row, block col, row in block, col in block, C, frame, y, x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(-1, channels * tp * p * p)


def preprocess_image(image: np.ndarray | Image.Image,
                     config: ImageProcessorConfig = ImageProcessorConfig(), *,
                     name: str = "image") -> ProcessedImage:
    """uint8 [H, W, 3] (grey, RGBA, PIL too) -> pixel_values [h*w/256, 1536], grid (1, h/16, w/16).

    Resize to `smart_resize`'s size (PIL bicubic), rescale to [0, 1], normalise, repeat to one
    temporal patch of identical frames, patchify. `name` (e.g. the file) prefixes every error.
    """
    image = as_pil(image, name)
    try:
        height, width = smart_resize(image.height, image.width, factor=config.factor,
                                     min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    except ImageError as error:
        raise ImageError(error.reason, f"{name}: {error}") from None
    channels_first = resize_and_normalise(image, height, width, config, name)
    # A still image is a clip of `temporal_patch_size` identical frames (what the Conv3d expects).
    frames = np.broadcast_to(channels_first, (config.temporal_patch_size, *channels_first.shape))
    grid_thw = (1, height // config.patch_size, width // config.patch_size)
    return ProcessedImage(patchify_frames(frames, config), grid_thw)


def image_placeholder_length(grid_thw: tuple[int, int, int], merge: int = 2) -> int:
    """Number of `<image_pad>` tokens for an image of `grid_thw` patches: one per merge block."""
    t, h, w = (int(value) for value in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"grid_thw {tuple(grid_thw)} does not tile into {merge}x{merge} merge "
                         "blocks")
    return t * h * w // (merge * merge)
