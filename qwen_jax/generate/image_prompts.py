"""Image prompts for `qwen-jax generate --image`: the files preprocessed as the model was trained to see
them, and each prompt's token ids with the images' blocks of patch tokens ahead of its text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.data.images import ImageError, ImageProcessorConfig, ProcessedImage, preprocess_image
from qwen_jax.data.mm_chat import expand_placeholders
from qwen_jax.data.mm_packing import tokenize_record
from qwen_jax.data.mm_sources import ImageTextRecord
from qwen_jax.data.records import Skip

# HF preprocessor_config.json fields that ImageProcessorConfig takes as they are.
PROCESSOR_FIELDS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "image_mean",
                    "image_std")


def image_processor_for(path: str | Path) -> ImageProcessorConfig:
    """How a model's images are preprocessed: a qwen-jax workdir's (or checkpoint step's) run config
    (data.min_pixels / max_pixels), an HF directory's preprocessor_config.json, else Qwen3.5's defaults."""
    from qwen_jax.train.datasets import data_config

    path = Path(path)
    if (path / "state").is_dir():  # a checkpoint step: WORKDIR/checkpoints/<step>
        path = path.parent.parent
    run = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "config" in run and (path / "checkpoints").is_dir():
        import ml_collections

        data = data_config(ml_collections.ConfigDict(run["config"]))
        return ImageProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return ImageProcessorConfig()
    fields = json.loads(preprocessor.read_text())
    size = fields.get("size") or {}
    given = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
    given |= {name: fields[name] for name in PROCESSOR_FIELDS if fields.get(name) is not None}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()
             if value is not None}
    try:
        return ImageProcessorConfig(**given)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{preprocessor}: {error}") from None


def load_images(files: list[str], processor: ImageProcessorConfig) -> list[ProcessedImage]:
    """Image files -> preprocessed images, in order; a file that cannot be read is named."""
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(preprocess_image(image, processor, name=f"--image={file}"))
        except (OSError, UnidentifiedImageError) as error:
            raise ConfigError(f"--image={file}: cannot read it as an image ({error})") from None
        except ImageError as error:
            raise ConfigError(str(error)) from None
    return images


def image_prompt_ids(tokenizer: Tokenizer, config: ModelConfig, texts: list[str], images: list[ProcessedImage],
                     *, chat: bool) -> list[list[int]]:
    """Each prompt's ids: its chat-rendered text with the images' placeholders expanded (chat), or the
    images' blocks then the text, as early-fusion pretraining lays a document out."""
    if config.vision is None:
        raise ConfigError("--image needs a model with a vision tower; this one has none")
    prompts = []
    for text in texts:
        try:
            if chat:
                ids = expand_placeholders(text, images, tokenizer, config)[0]
            else:  # tokenize_record ends a document with an end of text: a prompt goes on
                ids = tokenize_record(tokenizer, ImageTextRecord((*images, text), "--prompt"), config, 0).ids[:-1]
        except Skip as error:
            raise ConfigError(f"--image prompt {text[:60]!r}: {error.reason}: {error}") from None
        prompts.append(ids.tolist())
    return prompts


def pixel_inputs(images: list[ProcessedImage], rows: int) -> dict:
    """generate()'s pixel_values and image_grid_thw for `rows` prompts that each hold every image."""
    return {"pixel_values": np.concatenate([image.pixel_values for image in images] * rows),
            "image_grid_thw": np.array([image.grid_thw for image in images] * rows)}
