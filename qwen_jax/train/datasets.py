"""A run's data, per config.data: the default text corpus, or that text mixed with images and
videos (early fusion: digits, sklearn's photos, clips made from them, JSONL and ArrayRecord files)
into one packed stream."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import ml_collections

from qwen_jax.config import ConfigError, ModelConfig, TrainConfig
from qwen_jax.data import (
    VISION_TOKENS,
    ImageProcessorConfig,
    MMBatchIterator,
    VideoProcessorConfig,
    add_vision_tokens,
    camera_move_records,
    digits_image_text_records,
    load_image_text_array_record,
    load_image_text_jsonl,
    load_or_train_tokenizer,
    make_eval_batches,
    make_mm_eval_batches,
    make_mm_train_iterator,
    make_train_iterator,
    moving_digit_records,
    pack_corpus,
    pack_mm_corpus,
    python_docs_corpus,
    sample_photo_records,
    split_documents,
)
from qwen_jax.data.streaming import (TOKENIZER_SAMPLE_CHARS, TextRecords, TextStream,
                                     stream_eval_batches)
from qwen_jax.data.text_sources import TEXT_FILE_SUFFIXES, load_text_file
from qwen_jax.experiment import default_data_config
from qwen_jax.interop.init_from import tokenizer_file

DATA_KINDS = ("text", "image_text")
BUILT_IN_IMAGES = ("digits", "photos")
BUILT_IN_VIDEOS = ("moving_digits", "camera_moves")
EVAL_IMAGE_SHARE = 0.05  # of the image and of the video records, held out like the text documents


@dataclasses.dataclass
class RunData:
    """The model config (vision token ids set for image_text), the resumable train iterator,
    fixed eval batches, skipped records by reason, and whether batches hold images and videos."""

    model_config: ModelConfig
    iterator: Any  # next() -> batch; get_state() / set_state()
    eval_batches: list[dict]
    skipped: dict[str, int]
    images: bool = False
    videos: bool = False

    def skipped_now(self) -> dict[str, int]:
        """Bad records by reason: those met while loading, and those a stream has read since."""
        counts = collections.Counter(self.skipped)
        if isinstance(self.iterator, TextStream):
            counts.update(self.iterator.skipped)
        return dict(sorted(counts.items()))

    def close(self) -> None:
        """Stop the pipeline's worker processes or reading thread, if it has any."""
        if isinstance(self.iterator, (MMBatchIterator, TextStream)):
            self.iterator.close()


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data over the defaults, checked; an unknown field or kind is named."""
    merged = default_data_config()
    given = config.get("data") or {}
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise ConfigError(f"config.data has unknown field(s) {unknown}; known: {sorted(merged)}")
    merged.update(dict(given))
    if merged.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind is {merged.kind!r}; choose one of {DATA_KINDS}")
    video_weight = merged.video_weight if merged.video_sources else 0.0
    if not 0 < merged.image_weight < 1 or not 0 <= video_weight < 1 - merged.image_weight:
        raise ConfigError(f"data.image_weight must be in (0, 1) and data.video_weight in [0, 1 - "
                          f"image_weight) (text gets the rest), got {merged.image_weight} and "
                          f"{merged.video_weight}")
    return merged


def load_records(field: str, sources, images: ImageProcessorConfig, videos: VideoProcessorConfig,
                 strict: bool):
    """Records of every source of config.data.<field> in order, and the skipped counts of files."""
    built_in = {"digits": lambda: digits_image_text_records(images),
                "photos": lambda: sample_photo_records(images),
                "moving_digits": lambda: moving_digit_records(videos),
                "camera_moves": lambda: camera_move_records(videos)}
    known = BUILT_IN_IMAGES if field == "image_sources" else BUILT_IN_VIDEOS
    records, skipped = [], collections.Counter()
    for source in sources:
        if source in known:
            records += built_in[source]()
        elif source.endswith((".jsonl", ".array_record")):
            load = load_image_text_jsonl if source.endswith(".jsonl") else load_image_text_array_record
            loaded, counts = load(Path(source), images, strict=strict, video_config=videos)
            records += loaded
            skipped.update(counts)
        else:
            raise ConfigError(f"data.{field} entry {source!r} is neither one of {known} nor a "
                              ".jsonl / .array_record file")
    return records, skipped


def load_text_documents(sources, strict: bool) -> tuple[list[str], dict[str, int]]:
    """The documents of every source of config.data.text_sources in order, and the skipped counts."""
    documents, skipped = [], collections.Counter()
    for source in sources:
        if source == "python_docs":
            documents += python_docs_corpus()
        elif source.endswith(TEXT_FILE_SUFFIXES):
            loaded, counts = load_text_file(source, strict=strict)
            documents += loaded
            skipped.update(counts)
        else:
            raise ConfigError(f"data.text_sources entry {source!r} is neither 'python_docs' nor a "
                              f"{' / '.join(TEXT_FILE_SUFFIXES)} file")
    if not documents:
        raise ConfigError(f"data.text_sources {list(sources)} hold no usable document "
                          f"(skipped: {dict(skipped)})")
    return documents, dict(skipped)


def build_run_data(config: ml_collections.ConfigDict, workdir: Path, model_cfg: ModelConfig,
                   train_cfg: TrainConfig, *, process_index: int, process_count: int) -> RunData:
    """Tokenizer (init_from's, or trained once; kept in workdir), packed corpora, iterator and eval batches."""
    data = data_config(config)
    hosts = dict(process_index=process_index, process_count=process_count)
    if data.streaming:
        return _streamed_text(config, data, workdir, model_cfg, train_cfg, hosts)
    documents, skipped_files = load_text_documents(data.text_sources, data.strict)
    train_docs, held_out_docs = split_documents(documents, seed=0)
    images = data.kind == "image_text"
    # The vision tokens are special tokens of the run's tokenizer, inside the model's vocab. A run
    # from init_from takes that source's tokenizer where it has one.
    tokenizer = load_or_train_tokenizer(
        workdir / "tokenizer.json", train_docs, model_cfg.vocab_size,
        tuple(VISION_TOKENS.values()) if images else (),
        source=tokenizer_file(config.get("init_from")))
    if not images:
        train = pack_corpus(tokenizer, train_docs, seq_len=train_cfg.seq_len)
        held_out = pack_corpus(tokenizer, held_out_docs, seq_len=train_cfg.seq_len)
        iterator = make_train_iterator(train, global_batch_size=train_cfg.batch_size,
                                       seed=config.seed, **hosts)
        eval_batches = make_eval_batches(held_out, batch_size=train_cfg.batch_size,
                                         max_batches=train_cfg.eval_batches, **hosts)
        skipped = (collections.Counter(train.skipped) + collections.Counter(held_out.skipped)
                   + collections.Counter(skipped_files))
        return RunData(model_cfg, iterator, eval_batches, dict(skipped))

    if model_cfg.vision is None:
        raise ConfigError("data.kind 'image_text' needs a vision tower: set model.vision "
                          "(e.g. 'tiny')")
    model_cfg = model_cfg.replace(**add_vision_tokens(tokenizer))
    images = ImageProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    videos = VideoProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.video_max_pixels,
                                  fps=data.video_fps, max_frames=data.max_frames)
    skipped, train_records, held_out = collections.Counter(skipped_files), {}, list(held_out_docs)
    with_videos = False  # a record file may hold videos among its images: rows carry them then
    for name, field in (("images", "image_sources"), ("videos", "video_sources")):
        records, counts = load_records(field, data[field], images, videos, data.strict)
        skipped.update(counts)
        with_videos |= any(record.videos for record in records)
        if records:
            held = max(1, int(len(records) * EVAL_IMAGE_SHARE))
            train_records[name], held_out = records[held:], records[:held] + held_out
    pack = dict(config=model_cfg, seq_len=train_cfg.seq_len, max_patches=data.max_patches,
                max_video_patches=data.max_video_patches if with_videos else 0, strict=data.strict)
    corpora = {name: pack_mm_corpus(tokenizer, records, **pack)
               for name, records in {"text": train_docs, **train_records}.items()}
    shares = {"images": data.image_weight, "videos": data.video_weight}
    weights = {name: shares[name] for name in train_records}
    weights["text"] = 1 - sum(weights.values())
    # Held out: text, images and videos in one corpus, so eval/loss scores them all.
    held_out = pack_mm_corpus(tokenizer, held_out, **pack)
    iterator = make_mm_train_iterator(
        corpora, global_batch_size=train_cfg.batch_size, seed=config.seed, weights=weights,
        worker_count=data.workers, **hosts)
    eval_batches = make_mm_eval_batches(held_out, batch_size=train_cfg.batch_size,
                                        max_batches=train_cfg.eval_batches, **hosts)
    for corpus in (*corpora.values(), held_out):
        skipped.update(corpus.skipped)
    return RunData(model_cfg, iterator, eval_batches, dict(skipped), images=True,
                   videos=with_videos)


def _streamed_text(config, data, workdir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   hosts: dict) -> RunData:
    """RunData of a text corpus read as training goes (data.streaming)."""
    if data.kind != "text":
        raise ConfigError("data.streaming reads text only: set data.kind='text' or data.streaming=False")
    records = TextRecords(data.text_sources)
    tokenizer = load_or_train_tokenizer(
        workdir / "tokenizer.json",
        lambda: list(records.texts(held_out=False, strict=data.strict, max_chars=TOKENIZER_SAMPLE_CHARS)),
        model_cfg.vocab_size, source=tokenizer_file(config.get("init_from")))
    iterator = TextStream(records, tokenizer, seq_len=train_cfg.seq_len,
                          global_batch_size=train_cfg.batch_size, seed=config.seed, strict=data.strict,
                          **hosts)
    eval_batches = stream_eval_batches(records, tokenizer, seq_len=train_cfg.seq_len,
                                       batch_size=train_cfg.batch_size,
                                       max_batches=train_cfg.eval_batches, strict=data.strict, **hosts)
    return RunData(model_cfg, iterator, eval_batches, {})
