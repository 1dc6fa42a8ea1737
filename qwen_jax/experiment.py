"""Experiment configs: load a `configs/*.py` file's get_config() and apply `--config.a.b=v` overrides."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from qwen_jax.config import VISION_PRESETS, ConfigError, ModelConfig, TrainConfig, preset

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def default_data_config() -> ml_collections.ConfigDict:
    """config.data's fields and defaults (a config file may leave the section out: text)."""
    return ml_collections.ConfigDict({
        "kind": "text",
        # text: built-in "python_docs" and/or .jsonl / .array_record files of {"text": ...}, .txt files.
        "text_sources": ["python_docs"],
        # Read, tokenise and pack documents as training goes (corpora bigger than memory; documents
        # are shuffled, not packed rows) instead of packing everything at start.
        "streaming": False,
        # image_text only: built-in names or .jsonl / .array_record files.
        "image_sources": ["digits", "photos"],
        "image_weight": 0.35,  # share of rows drawn from the image-text records (streaming: of documents)
        "max_patches": 256,  # image patches per row (a multiple of spatial_merge_size^2)
        "min_pixels": 32 * 32,
        "max_pixels": 64 * 64,
        # Videos ([] for none): built-in clip sets or files, as above (a file may mix both).
        "video_sources": ["moving_digits", "camera_moves"],
        "video_weight": 0.15,  # share of rows drawn from the video-text records (streaming: of documents)
        "max_video_patches": 128,  # video patches per row
        "video_fps": 2.0,  # frames sampled per second of video
        "max_frames": 8,
        "video_max_pixels": 4 * 64 * 64,  # frames x height x width of a resized clip
        # chat (supervised fine-tuning): built-in "python_help" and/or .jsonl / .array_record files of
        # {"messages": [...], "tools": [...]}; rendered by chat_template: "" the built-in ChatML,
        # "init_from" the one beside init_from's tokenizer, or a .jinja file / HF directory.
        "chat_sources": ["python_help"],
        "chat_template": "",
        "chat_template_kwargs": {},  # given to the template, e.g. {"enable_thinking": False}
        "chat_loss": "assistant",  # learn the assistant turns (and the token ending each), or "all"
        "workers": 0,  # Grain worker processes building rows (in memory; a stream reads in threads)
        "strict": False,  # stop at the first bad record instead of skipping and counting it
    })


# Sections whose known fields may be set from the command line even if the file omits them (and rl's).
TYPED_SECTIONS = {"model": MODEL_FIELDS, "train": {f.name for f in dataclasses.fields(TrainConfig)},
                  "data": set(default_data_config())}


def _known_fields(section: str) -> set[str]:
    """The fields config.<section> may take from the command line though the file leaves them out."""
    if section == "rl":  # imported here: the RL loop imports this module
        from qwen_jax.rl.loop import RLConfig

        return {field.name for field in dataclasses.fields(RLConfig)}
    return TYPED_SECTIONS.get(section, set())


def local_workdir(workdir: str | Path) -> Path:
    """--workdir as a Path. A URL is refused: the run writes its workdir through the file system, and
    pathlib would turn gs://b/run into a local directory gs:/b/run on each host."""
    text = str(workdir)
    if "://" in text:
        raise ConfigError(f"--workdir={text} is a URL, but qwen-jax writes its workdir through the file "
                          "system: mount the bucket on every host (Cloud Storage FUSE) and give the "
                          f"mount's path, e.g. --workdir=/gcs/{text.split('://', 1)[1]}")
    return Path(workdir)


def load_config(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Run `path`'s get_config() and apply overrides like 'train.lr=3e-4' (without '--config.')."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"qwen_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config file {path} defines no get_config()")
    config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def _parse_value(text: str):
    """'3e-4' -> 0.0003, 'true' -> True, '[1,2]' -> [1, 2]; anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set 'a.b.c=value' in config; an unknown field is an error naming it.

    model.* and train.* may also set any ModelConfig / TrainConfig field the file leaves out.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like --config.a.b=value")
    dotted, text = override.split("=", 1)
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise ConfigError(f"config field {'.'.join(parents[: i + 1])!r} does not exist")
        node = node[name]
    value = _parse_value(text)
    if leaf not in node:
        if len(parents) == 1 and leaf in _known_fields(parents[0]):
            with node.unlocked():
                node[leaf] = value
            return
        raise ConfigError(f"config field {dotted!r} does not exist")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and value is not None and type(current) is not type(value):
        alike = ((list, tuple), (dict, ml_collections.ConfigDict))  # a list for a tuple, a dict for a section
        if not any(isinstance(current, kinds) and isinstance(value, kinds) for kinds in alike):
            raise ConfigError(
                f"config field {dotted!r} expects {type(current).__name__}, got {text!r}")
    node[leaf] = value


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """config.model.preset plus every other config.model.* field as an override, validated;
    config.model.vision names a VISION_PRESETS tower (or "" for none)."""
    fields = dict(config.model)
    name = fields.pop("preset")
    unknown = sorted(set(fields) - MODEL_FIELDS)
    if unknown:
        raise ConfigError(f"config.model has unknown field(s) {unknown}; ModelConfig fields: {sorted(MODEL_FIELDS)}")
    if isinstance(fields.get("vision"), str):
        tower = fields["vision"]
        if tower and tower not in VISION_PRESETS:
            raise ConfigError(f"model.vision {tower!r} is unknown; towers: {sorted(VISION_PRESETS)}")
        fields["vision"] = VISION_PRESETS[tower] if tower else None
    return preset(name, **fields)


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    """config.train as a validated TrainConfig; an unknown field is named."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config.train) - known)
    if unknown:
        raise ConfigError(f"config.train has unknown field(s) {unknown}; known: {sorted(known)}")
    return TrainConfig(**config.train)
