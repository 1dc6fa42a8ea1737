"""A run's data, per config.data: the default text corpus, or that text mixed with images and
videos (early fusion: digits, sklearn's photos, clips made from them, JSONL and ArrayRecord files)
into one packed stream; packed in memory at start, or read as the run goes (data.streaming); or
conversations for supervised fine-tuning (kind chat, always read as the run goes)."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections

from qwen_jax.config import ConfigError, ModelConfig, TrainConfig
from qwen_jax.data import (
    VISION_TOKENS,
    ImageProcessorConfig,
    MMBatchIterator,
    VideoProcessorConfig,
    add_vision_tokens,
    load_image_text_array_record,
    load_image_text_jsonl,
    load_or_train_tokenizer,
    make_eval_batches,
    make_mm_eval_batches,
    make_mm_train_iterator,
    make_train_iterator,
    pack_corpus,
    pack_mm_corpus,
    python_docs_corpus,
    split_documents,
)
from qwen_jax.data.chat_stream import ChatStream, chat_eval_batches, chat_records, rendered_texts
from qwen_jax.data.conversations import TokenizeConversation, chat_renderer
from qwen_jax.data.mm_chat import (TokenizeMediaChatRecord, TokenizeMediaConversation, media_chat_eval_batches,
                                    media_chat_records, media_chat_texts)
from qwen_jax.data.mm_pipeline import row_budget
from qwen_jax.data.mm_streaming import MMStream, built_in_media, media_records, mm_stream_eval_batches
from qwen_jax.data.preferences import PairRows, TokenizePreference, preference_records
from qwen_jax.data.streaming import (TOKENIZER_SAMPLE_CHARS, TextStream, stream_eval_batches, text_records,
                                     texts_of)
from qwen_jax.data.text_sources import TEXT_FILE_SUFFIXES, load_text_file
from qwen_jax.data.tokenizer import pad_id, write_text_atomically
from qwen_jax.experiment import default_data_config
from qwen_jax.interop.init_from import tokenizer_dir, tokenizer_file

DATA_KINDS = ("text", "image_text", "chat", "preference")
STREAMS = (TextStream, MMStream, ChatStream)
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
    pairs: bool = False  # rows 2i, 2i + 1: a preference pair's chosen and rejected sides (DPO)

    def skipped_now(self) -> dict[str, int]:
        """Bad records by reason: those met while loading, and those a stream has read since."""
        counts = collections.Counter(self.skipped)
        if isinstance(self.iterator, STREAMS):
            counts.update(self.iterator.skipped)
        return dict(sorted(counts.items()))

    def close(self) -> None:
        """Stop the pipeline's worker processes or reading thread, if it has any."""
        if isinstance(self.iterator, (MMBatchIterator, *STREAMS)):
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
    built_in = built_in_media(field, images, videos)
    records, skipped = [], collections.Counter()
    for source in sources:
        if source in built_in:
            records += built_in[source]()
        elif source.endswith((".jsonl", ".array_record")):
            load = load_image_text_jsonl if source.endswith(".jsonl") else load_image_text_array_record
            loaded, counts = load(Path(source), images, strict=strict, video_config=videos)
            records += loaded
            skipped.update(counts)
        else:
            raise ConfigError(f"data.{field} entry {source!r} is neither one of {sorted(built_in)} nor a "
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
    if data.kind == "chat":
        return _chat(config, data, workdir, model_cfg, train_cfg, hosts)
    if data.kind == "preference":
        return _preference(config, data, workdir, model_cfg, train_cfg, hosts)
    if data.streaming:
        return _streamed(config, data, workdir, model_cfg, train_cfg, hosts)
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

    model_cfg, images, videos = _vision_setup(data, model_cfg, tokenizer)
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


def _vision_setup(data, model_cfg: ModelConfig, tokenizer) -> tuple[ModelConfig, ImageProcessorConfig,
                                                                     VideoProcessorConfig]:
    """The model config with the tokenizer's vision token ids, and the image and video processors."""
    if model_cfg.vision is None:
        raise ConfigError("data.kind 'image_text' needs a vision tower: set model.vision "
                          "(e.g. 'tiny')")
    return model_cfg.replace(**add_vision_tokens(tokenizer)), *media_processors(data)


def media_processors(data) -> tuple[ImageProcessorConfig, VideoProcessorConfig]:
    """config.data's image and video preprocessing."""
    return (ImageProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels),
            VideoProcessorConfig(min_pixels=data.min_pixels, max_pixels=data.video_max_pixels,
                                 fps=data.video_fps, max_frames=data.max_frames))


def _streamed(config, data, workdir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
              hosts: dict) -> RunData:
    """RunData of documents read as training goes (data.streaming): text, or text, images and videos."""
    text = text_records(data.text_sources)
    images = data.kind == "image_text"
    tokenizer = load_or_train_tokenizer(
        workdir / "tokenizer.json",
        lambda: list(texts_of(text, held_out=False, strict=data.strict, max_chars=TOKENIZER_SAMPLE_CHARS)),
        model_cfg.vocab_size, tuple(VISION_TOKENS.values()) if images else (),
        source=tokenizer_file(config.get("init_from")))
    batches = dict(batch_size=train_cfg.batch_size, max_batches=train_cfg.eval_batches, strict=data.strict,
                   **hosts)
    if not images:
        iterator = TextStream(text, tokenizer, seq_len=train_cfg.seq_len,
                              global_batch_size=train_cfg.batch_size, seed=config.seed, strict=data.strict,
                              **hosts)
        return RunData(model_cfg, iterator, stream_eval_batches(text, tokenizer, seq_len=train_cfg.seq_len,
                                                                **batches), {})
    model_cfg, image_config, video_config = _vision_setup(data, model_cfg, tokenizer)
    groups = {"text": text,
              "images": media_records("image_sources", data.image_sources, image_config, video_config),
              "videos": media_records("video_sources", data.video_sources, image_config, video_config)}
    # Rows carry video arrays when video sources are named (an image file's videos need them too).
    videos = bool(data.video_sources)
    budget = row_budget(model_cfg, train_cfg.seq_len, data.max_patches,
                        max_video_patches=data.max_video_patches if videos else 0)
    weights = {name: share for name, share in (("images", data.image_weight), ("videos", data.video_weight))
               if len(groups[name])}
    weights["text"] = 1 - sum(weights.values())
    iterator = MMStream(groups, tokenizer, model_cfg, budget, global_batch_size=train_cfg.batch_size,
                        seed=config.seed, weights=weights, strict=data.strict, **hosts)
    eval_batches = mm_stream_eval_batches(groups, tokenizer, model_cfg, budget, **batches)
    return RunData(model_cfg, iterator, eval_batches, {}, images=True, videos=videos)


def _chat(config, data, workdir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, hosts: dict) -> RunData:
    """RunData of conversations (supervised fine-tuning); with images and videos where the model has a
    vision tower. The template the run trains with is kept as WORKDIR/chat_template.jinja, so
    `generate --chat` and a later RL run of a checkpoint use it too."""
    vision = model_cfg.vision is not None
    records = (media_chat_records(data.chat_sources, *media_processors(data)) if vision
               else chat_records(data.chat_sources))
    renderer = chat_renderer(data.chat_template, tokenizer_dir(config.get("init_from")),
                             dict(data.chat_template_kwargs))
    texts = media_chat_texts if vision else rendered_texts
    tokenizer = load_or_train_tokenizer(
        workdir / "tokenizer.json",
        lambda: list(texts(records, renderer, strict=data.strict, max_chars=TOKENIZER_SAMPLE_CHARS)),
        model_cfg.vocab_size, tuple(VISION_TOKENS.values()) if vision else (),
        source=tokenizer_file(config.get("init_from")))
    tokenize = TokenizeConversation(tokenizer, renderer, seq_len=train_cfg.seq_len, loss_on=data.chat_loss)
    tokenize.check()  # before the run keeps the template: a refused one must not stay in the workdir
    _keep_template(workdir, renderer)
    if vision:
        return _media_chat(data, records, renderer, tokenizer, model_cfg, train_cfg, config.seed, hosts)
    rows = dict(pad=pad_id(tokenizer), strict=data.strict, **hosts)
    iterator = ChatStream(records, tokenize, global_batch_size=train_cfg.batch_size, seed=config.seed, **rows)
    eval_batches = chat_eval_batches(records, tokenize, batch_size=train_cfg.batch_size,
                                     max_batches=train_cfg.eval_batches, **rows)
    return RunData(model_cfg, iterator, eval_batches, {})


def _keep_template(workdir: Path, renderer) -> None:
    """WORKDIR/chat_template.jinja: the (checked) template the run trains with, unless one is there."""
    kept = workdir / "chat_template.jinja"
    if not kept.exists() and jax.process_index() == 0:
        write_text_atomically(kept, renderer.template)


def _preference(config, data, workdir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                hosts: dict) -> RunData:
    """RunData of preference pairs (DPO, text only): init_from's tokenizer, the chat template as an SFT run's."""
    source = tokenizer_file(config.get("init_from"))
    if source is None:
        raise ConfigError("data.kind 'preference' continues a model: init_from must be set and carry its "
                          f"tokenizer.json (init_from is {config.get('init_from')!r})")
    if model_cfg.vision is not None:
        raise ConfigError("data.kind 'preference' is text only; this model has a vision tower (model.vision)")
    for name, rows in (("train.batch_size / train.grad_accum", train_cfg.batch_size // train_cfg.grad_accum),
                       ("train.batch_size per host", train_cfg.batch_size // hosts["process_count"])):
        if rows % 2:
            raise ConfigError(f"data.kind 'preference' puts each pair in two rows: {name} must be even, got {rows}")
    records = preference_records(data.chat_sources)
    renderer = chat_renderer(data.chat_template, tokenizer_dir(config.init_from), dict(data.chat_template_kwargs))
    # init_from's tokenizer is copied (source): nothing is trained, so no texts are needed.
    tokenizer = load_or_train_tokenizer(workdir / "tokenizer.json", lambda: [], model_cfg.vocab_size, (),
                                        source=source)
    tokenize = TokenizePreference(TokenizeConversation(tokenizer, renderer, seq_len=train_cfg.seq_len,
                                                       loss_on=data.chat_loss))
    tokenize.check()
    _keep_template(workdir, renderer)
    rows = dict(pad=pad_id(tokenizer), strict=data.strict, packing=PairRows, **hosts)
    iterator = ChatStream(records, tokenize, global_batch_size=train_cfg.batch_size, seed=config.seed, **rows)
    eval_batches = chat_eval_batches(records, tokenize, batch_size=train_cfg.batch_size,
                                     max_batches=train_cfg.eval_batches, **rows)
    return RunData(model_cfg, iterator, eval_batches, {}, pairs=True)


def _media_chat(data, records, renderer, tokenizer, model_cfg: ModelConfig, train_cfg: TrainConfig, seed,
                hosts: dict) -> RunData:
    """Conversations with images and videos, planned into image-text rows (with video arrays unless
    data.max_video_patches is 0)."""
    model_cfg = model_cfg.replace(**add_vision_tokens(tokenizer))
    budget = row_budget(model_cfg, train_cfg.seq_len, data.max_patches, max_video_patches=data.max_video_patches)
    tokenize = TokenizeMediaConversation(tokenizer, renderer, model_cfg, budget, loss_on=data.chat_loss)
    conversations = TokenizeMediaChatRecord(tokenize, data.strict)
    iterator = MMStream({"chat": records}, tokenizer, model_cfg, budget, global_batch_size=train_cfg.batch_size,
                        seed=seed, strict=data.strict, tokenize_for={"chat": conversations}, **hosts)
    eval_batches = media_chat_eval_batches(records, tokenize, model_cfg, budget, pad=pad_id(tokenizer),
                                           batch_size=train_cfg.batch_size, max_batches=train_cfg.eval_batches,
                                           strict=data.strict, **hosts)
    return RunData(model_cfg, iterator, eval_batches, {}, images=True, videos=budget.max_video_patches > 0)
