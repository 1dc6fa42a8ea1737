"""Image and video prompts for `qwen-jax generate --image / --video`: the files preprocessed as the model
was trained to see them, and each prompt's token ids with their blocks of patch tokens ahead of its text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.data.images import ImageProcessorConfig, ProcessedImage
from qwen_jax.data.mm_chat import expand_placeholders
from qwen_jax.data.mm_packing import tokenize_record
from qwen_jax.data.mm_sources import ImageTextRecord, load_part
from qwen_jax.data.records import Skip
from qwen_jax.data.videos import ProcessedVideo, VideoProcessorConfig

# HF preprocessor fields that the processor configs take as they are (size.shortest_edge / longest_edge
# become min_pixels / max_pixels).
PROCESSOR_FIELDS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "image_mean",
                    "image_std")
VIDEO_FIELDS = ("fps", "min_frames", "max_frames")


def media_processors_for(path: str | Path) -> tuple[ImageProcessorConfig, VideoProcessorConfig]:
    """How a model's images and videos are preprocessed: a qwen-jax workdir's (or checkpoint step's) run
    config, an HF directory's preprocessor_config.json and video_preprocessor_config.json, else Qwen3.5's
    defaults."""
    path = Path(path)
    if (path / "state").is_dir():  # a checkpoint step: WORKDIR/checkpoints/<step>
        path = path.parent.parent
    run = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "config" in run and (path / "checkpoints").is_dir():
        import ml_collections

        from qwen_jax.train.datasets import data_config, media_processors

        return media_processors(data_config(ml_collections.ConfigDict(run["config"])))
    return (_from_hf(path / "preprocessor_config.json", ImageProcessorConfig, PROCESSOR_FIELDS),
            _from_hf(path / "video_preprocessor_config.json", VideoProcessorConfig, PROCESSOR_FIELDS + VIDEO_FIELDS))


def _from_hf(file: Path, kind, names: tuple[str, ...]):
    """A processor config from an HF preprocessor file's fields, or the defaults where there is no file."""
    if not file.is_file():
        return kind()
    fields = json.loads(file.read_text())
    size = fields.get("size") or {}
    given = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
    given |= {name: fields[name] for name in names if fields.get(name) is not None}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()
             if value is not None}
    try:
        return kind(**given)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{file}: {error}") from None


def load_prompt_media(images: list[str], videos: list[str], processors: tuple[ImageProcessorConfig,
                      VideoProcessorConfig]) -> list[ProcessedImage | ProcessedVideo]:
    """Image files, then video files or frame folders -> preprocessed as a data record's parts are
    (mm_sources.load_part), in that order; a bad one is named."""
    media = []
    for kind, files in (("image", images), ("video", videos)):
        for file in files:
            try:
                media.append(load_part({kind: str(file)}, Path("."), *processors))
            except Skip as skip:
                problem = "cannot read it as an image" if kind == "image" else "cannot read it as a video"
                raise ConfigError(f"--{kind}={file}: {problem} ({skip.reason}: {skip})") from None
    return media


def media_prompt_ids(tokenizer: Tokenizer, config: ModelConfig, texts: list[str],
                     media: list[ProcessedImage | ProcessedVideo], *, chat: bool) -> list[list[int]]:
    """Each prompt's ids: its chat-rendered text with the placeholders expanded (chat), or the media's
    blocks then the text, as early-fusion pretraining lays a document out."""
    if config.vision is None:
        raise ConfigError("--image and --video need a model with a vision tower; this one has none")
    prompts = []
    for text in texts:
        try:
            if chat:
                ids = expand_placeholders(text, media, tokenizer, config)[0]
            else:  # tokenize_record ends a document with an end of text: a prompt goes on
                ids = tokenize_record(tokenizer, ImageTextRecord((*media, text), "--prompt"), config, 0).ids[:-1]
        except Skip as error:
            raise ConfigError(f"the prompt {text[:60]!r} with its images and videos: {error.reason}: {error}") from None
        prompts.append(ids.tolist())
    return prompts


def pixel_inputs(media: list[ProcessedImage | ProcessedVideo], rows: int) -> dict:
    """generate()'s pixel inputs for `rows` prompts that each hold every image and video."""
    inputs = {}
    for kind, pixels, grids in ((ProcessedImage, "pixel_values", "image_grid_thw"),
                                (ProcessedVideo, "pixel_values_videos", "video_grid_thw")):
        items = [m for m in media if isinstance(m, kind)] * rows
        if items:
            inputs[pixels] = np.concatenate([m.pixel_values for m in items])
            inputs[grids] = np.array([m.grid_thw for m in items])
    return inputs
