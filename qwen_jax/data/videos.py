"""Videos for the vision tower: decode, sample frames at a target fps, resize within the clip's pixel
budget, normalise, patchify with temporal patch 2 (numpy).

Follows Hugging Face's `Qwen3VLVideoProcessor` (Qwen3.5's video processor) and the timestamps of
`Qwen3VLProcessor`: the same frame indices, sizes and timestamps (tests/test_videos.py checks them
against HF's own functions). Frames are resized with PIL bicubic, as `images.py` does for images;
HF resizes videos with torchvision, which this package does not need.

A clip is read from a directory of frame images (sorted by name; its fps given by the record) or
from a video file that PyAV decodes (mp4, webm, gif, ...; the fps is the container's). Only the
sampled frames are kept in memory.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from qwen_jax.data.images import (
    MAX_ASPECT_RATIO,
    ImageError,
    as_pil,
    check_processor_fields,
    patchify_frames,
    resize_and_normalise,
)

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
UNKNOWN_FPS = 24.0  # what HF assumes when a clip's frame rate is unknown


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig:
    """How clips become patches: HF `Qwen3VLVideoProcessor`'s class defaults (a checkpoint's
    `video_preprocessor_config.json` may set other values; pass them here).

    min_pixels and max_pixels bound frames * H * W of the resized clip (HF's size.shortest_edge /
    longest_edge: the budget covers the whole clip, not one frame). fps is the sampling rate;
    min_frames and max_frames bound the frames sampled. Tiny demo models want a small budget, e.g.
    max_pixels=8*64*64, max_frames=8.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 768 * 32 * 32
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        check_processor_fields(self)
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")
        if self.max_frames < max(self.min_frames, self.temporal_patch_size):
            raise ValueError(f"max_frames ({self.max_frames}) is below min_frames "
                             f"({self.min_frames}) or temporal_patch_size ({self.temporal_patch_size})")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    @property
    def factor(self) -> int:
        """Resized H and W are multiples of this: one 2x2 merge block of patches."""
        return self.patch_size * self.merge_size


class VideoError(ImageError):
    """A clip that cannot be read or preprocessed; `reason` names the problem for skip counters."""


class ProcessedVideo(NamedTuple):
    """pixel_values float32 [t*h*w, 3*temporal*patch*patch], grid_thw (t, h, w) in patches, and
    timestamps: the seconds of each of the t temporal patches (their frames' mean)."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]


def sample_frame_indices(total_frames: int, video_fps: float, config: VideoProcessorConfig, *,
                         name: str = "video") -> np.ndarray:
    """int [n]: the frames to keep, config.fps per second of video, spread evenly (HF's rule: at
    least min_frames, at most max_frames and every frame). `name` prefixes the error."""
    if total_frames < 1:
        raise VideoError("empty_video", f"{name}: no frames")
    count = int(total_frames / video_fps * config.fps)
    count = min(max(count, config.min_frames), config.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int)


def frame_timestamps(indices, video_fps: float, temporal_patch_size: int = 2) -> tuple[float, ...]:
    """Seconds of each temporal patch: the mean time of its first and last frame, the last patch
    filled up by repeating the last frame (HF's `_calculate_timestamps`)."""
    indices = [int(index) for index in indices]
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [index / video_fps for index in indices]
    return tuple((seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
                 for i in range(0, len(seconds), temporal_patch_size))


def timestamp_text(seconds: float) -> str:
    """The text in front of each temporal patch's block (Qwen3-VL's processor)."""
    return f"<{seconds:.1f} seconds>"


def video_smart_resize(num_frames: int, height: int, width: int, config: VideoProcessorConfig
                       ) -> tuple[int, int]:
    """(h, w), multiples of config.factor, near the aspect ratio, with the clip's frames * h * w
    within [min_pixels, max_pixels] (HF's video smart_resize: frames below one factor are first
    scaled up to it; halves round to even)."""
    factor, temporal = config.factor, config.temporal_patch_size
    if num_frames < temporal:
        raise VideoError("video_too_short", f"{num_frames} frame(s): a clip needs at least "
                         f"temporal_patch_size = {temporal}")
    if height < 1 or width < 1:
        raise VideoError("image_too_small", f"{height}x{width} frames have no pixels")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoError("extreme_aspect_ratio", f"{height}x{width} frames are longer than "
                         f"{MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > config.max_pixels:
        beta = math.sqrt(num_frames * height * width / config.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_frames(frames, timestamps: tuple[float, ...], config: VideoProcessorConfig, *,
                      name: str = "video") -> ProcessedVideo:
    """Sampled frames (uint8 [H, W, 3] arrays or PIL images, one size) -> a ProcessedVideo.

    The clip is resized as a whole (`video_smart_resize`), each frame bicubic; the last frame is
    repeated to fill the last temporal patch. `name` (e.g. the file) prefixes every error.
    """
    images = [as_pil(frame, f"{name} frame {i}") for i, frame in enumerate(frames)]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise VideoError("frame_size_mismatch", f"{name}: frames of different sizes {sorted(sizes)}")
    try:
        width, height = images[0].size if images else (0, 0)
        new_height, new_width = video_smart_resize(len(images), height, width, config)
    except VideoError as error:
        raise VideoError(error.reason, f"{name}: {error}") from None
    clip = np.stack([resize_and_normalise(image, new_height, new_width, config, name)
                     for image in images])  # [T, 3, H, W]
    clip = np.concatenate([clip, np.repeat(clip[-1:], -len(clip) % config.temporal_patch_size, 0)])
    grid_thw = (len(clip) // config.temporal_patch_size, new_height // config.patch_size,
                new_width // config.patch_size)
    if len(timestamps) != grid_thw[0]:
        raise ValueError(f"{name}: {len(timestamps)} timestamps for {grid_thw[0]} temporal patches")
    return ProcessedVideo(patchify_frames(clip, config), grid_thw, tuple(timestamps))


def preprocess_video(frames, video_fps: float, config: VideoProcessorConfig = VideoProcessorConfig(),
                     *, name: str = "video") -> ProcessedVideo:
    """Every frame of a clip (uint8 [T, H, W, 3], or a list of frames) at video_fps -> sample at
    config.fps, then `preprocess_frames`."""
    indices = sample_frame_indices(len(frames), video_fps, config, name=name)
    return preprocess_frames([frames[i] for i in indices],
                             frame_timestamps(indices, video_fps, config.temporal_patch_size),
                             config, name=name)


def load_video(path: str | Path, config: VideoProcessorConfig, *, fps: float | None = None
               ) -> ProcessedVideo:
    """A frame directory (fps from the caller, else 24) or a video file (PyAV; the container's fps
    unless `fps` is given) -> a ProcessedVideo. Raises VideoError (missing_video, corrupt_video, ...)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        video_fps = fps or UNKNOWN_FPS
        indices = sample_frame_indices(len(files), video_fps, config, name=str(path))
        frames = [_read_frame(files[i]) for i in indices]
    elif path.is_file():
        frames, indices, video_fps = _decode_sampled(path, config, fps)
    else:
        raise VideoError("missing_video", f"{path} does not exist")
    timestamps = frame_timestamps(indices, video_fps, config.temporal_patch_size)
    return preprocess_frames(frames, timestamps, config, name=str(path))


def _read_frame(path: Path) -> Image.Image:
    """One frame image, decoded now (a truncated file fails here, as a corrupt video)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise VideoError("corrupt_video", f"{path}: {type(error).__name__}: {error}") from None
    return image


def _decode_sampled(path: Path, config: VideoProcessorConfig, fps: float | None):
    """(sampled frames uint8 [H, W, 3], their indices, fps) of a video file, decoded with PyAV."""
    import av  # here, not at the top: only video files need it

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            video_fps = fps or (float(stream.average_rate) if stream.average_rate else UNKNOWN_FPS)
            # A header without a frame count (0) costs one extra pass that counts them.
            total = stream.frames or sum(1 for _ in container.decode(stream))
        indices = sample_frame_indices(total, video_fps, config, name=str(path))
        wanted, frames = set(indices.tolist()), {}
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, IndexError) as error:  # IndexError: the file has no video stream
        raise VideoError("corrupt_video", f"{path}: {type(error).__name__}: {error}") from None
    if len(frames) < len(wanted):  # a truncated file: its header promises more than it holds
        raise VideoError("corrupt_video", f"{path}: {len(frames)} of the {len(wanted)} sampled "
                         f"frames decode (the header says {total})")
    return [frames[i] for i in indices], indices, video_fps
