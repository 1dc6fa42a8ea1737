"""Image-, video- and text documents read, preprocessed, tokenised and packed while training runs
(data.streaming with data.kind "image_text"): image corpora bigger than memory.

The text, image and video sources are record indexes (`RecordIndex`), each shuffled anew every
epoch. Grain mixes them by data.image_weight and data.video_weight as shares of the documents read
(the in-memory pipeline's weights are shares of rows), gives host p every P-th document, and
decodes, resizes and tokenises ahead in background threads (PIL decodes and resizes outside the
GIL). `MMStream` plans rows by mm_packing's greedy rule as the documents arrive, never splitting an
image or a video, and builds them with `build_row`. Every row begins with a piece of a document, and
planning from a row's start depends on nothing before it, so the state is that document, the token
its piece starts at, and the skip counts: planning again from there gives the same rows.

Held out for eval: text documents as the text stream holds them out (a hash of the text), image and
video records by a hash of the record itself, EVAL_MEDIA_SHARE of them, before any image is decoded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.data.images import ImageProcessorConfig
from qwen_jax.data.mm_packing import (RowBudget, TokenizedDocument, budget_problem, build_row,
                                      check_vision_tokens, split_points, tokenize_record, usage)
from qwen_jax.data.mm_pipeline import make_mm_eval_batches, pack_mm_corpus
from qwen_jax.data.clips import camera_move_records, moving_digit_records
from qwen_jax.data.mm_sources import (MIN_IMAGE_SIDE, digits_image_text_records, parse_media_record,
                                      sample_photo_records)
from qwen_jax.data.pipeline import per_host_batch_size
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import is_held_out, stable_unit_hash
from qwen_jax.data.streaming import PASSED_OVER, DocumentReader, RecordIndex, read_document, text_records
from qwen_jax.data.tokenizer import eos_id, pad_id
from qwen_jax.data.videos import VideoProcessorConfig

EVAL_MEDIA_SHARE = 0.05  # of the image and of the video records
READ_THREADS = 2  # documents decoded and tokenised at once
PREFETCH_DOCUMENTS = 64


def built_in_media(field: str, images: ImageProcessorConfig, videos: VideoProcessorConfig) -> dict:
    """The built-in sets config.data.<field> may name (image_sources or video_sources): name -> loader."""
    if field == "image_sources":
        return {"digits": lambda: digits_image_text_records(images), "photos": lambda: sample_photo_records(images)}
    return {"moving_digits": lambda: moving_digit_records(videos), "camera_moves": lambda: camera_move_records(videos)}


def media_records(field: str, sources: Sequence[str], images: ImageProcessorConfig,
                  videos: VideoProcessorConfig) -> RecordIndex:
    """The records of config.data.image_sources or video_sources: built-in sets, JSONL / ArrayRecord
    files of documents with images and videos (their paths relative to the file's folder)."""
    def parser(path):
        def parse(record: bytes, where: str):
            return parse_media_record(record, path.parent, images, videos, MIN_IMAGE_SIDE, where)
        return parse

    built_in = {name: (load, lambda record, where: record)
                for name, load in built_in_media(field, images, videos).items()}
    return RecordIndex(field, sources, built_in, parser, (".jsonl", ".array_record"))


def media_held_out(where: str, record) -> bool:
    """A hash of the record (a built-in's name and index), so the split needs no decoding."""
    key = record.decode("latin-1") if isinstance(record, bytes) else where
    return stable_unit_hash(key, 0) < EVAL_MEDIA_SHARE


class TokenizeDocument:
    """(where, record, parse) -> a TokenizedDocument that fits a row; the skip reason where it is bad
    or never fits (strict: raise ValueError naming it); PASSED_OVER where it is blank or held out."""

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, budget: RowBudget, *, media: bool,
                 strict: bool):
        self._tokenizer, self._config, self._budget = tokenizer, config, budget
        self._eos, self._media, self._strict = eos_id(tokenizer), media, strict

    def __call__(self, item) -> TokenizedDocument | str:
        where, record, parse = item
        if self._media and media_held_out(where, record):
            return PASSED_OVER
        try:
            document = parse(record, where)
            if document is None or (not self._media and is_held_out(document)):
                return PASSED_OVER
            tokenized = tokenize_record(self._tokenizer, document, self._config, self._eos)
            problem = budget_problem(tokenized, self._budget)
            if problem is None:
                return tokenized
            raise Skip(problem, "does not fit a row")
        except Skip as skip:
            if self._strict:
                raise skip.at(where) from None
            return skip.reason


class MMStream:
    """Endless batches {key: [global_batch_size // process_count, ...]} of packed image-text rows
    (mm_pipeline's row keys). Sources come shuffled with `seed` (None: in order), mixed by `weights`
    (one per group of `groups`, e.g. {"text": 0.5, "images": 0.35, "videos": 0.15}); host p reads
    every P-th document. `skipped` counts bad records read so far. Resume with get_state / set_state.
    `tokenize_for` maps a group to its own (where, record, parse) -> document function (e.g. the
    conversations of mm_chat.py), in place of `TokenizeDocument`."""

    def __init__(self, groups: Mapping[str, RecordIndex], tokenizer: Tokenizer, config: ModelConfig,
                 budget: RowBudget, *, global_batch_size: int, seed: int | None,
                 weights: Mapping[str, float] | None = None, strict: bool = False, process_index: int = 0,
                 process_count: int = 1, tokenize_for: Mapping[str, Callable] | None = None):
        check_vision_tokens(tokenizer, config)
        names = sorted(name for name, records in groups.items() if len(records))
        if not names:
            raise ConfigError("the data sources hold no records")
        streams = []
        for k, name in enumerate(names):
            records = grain.MapDataset.source(groups[name])
            if seed is not None:
                records = records.shuffle(seed + 7919 * k)  # the epoch is folded in: anew each epoch
            tokenize = (tokenize_for or {}).get(name) or TokenizeDocument(
                tokenizer, config, budget, media=name != "text", strict=strict)
            streams.append(records.repeat().map(tokenize))
        weights = weights or {name: 1.0 for name in names}
        mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [weights[n] for n in names])
        self._documents = mixed[process_index::process_count]
        # More records than all the groups hold without a train document: there is none.
        self._give_up_after = sum(len(groups[name]) for name in names) + 1
        self._per_host = per_host_batch_size(global_batch_size, process_count)
        self._config, self._budget, self._limit = config, budget, np.array(budget)
        self._pad = pad_id(tokenizer)
        self.set_state({"record": 0, "start": 0, "skipped": {}})

    def get_state(self) -> dict:
        """{"record": the document the next row begins with, "start": the token its piece starts at,
        "skipped": bad records by reason}."""
        first = self._ready[0][0] if self._ready else self._row[0] if self._row else None
        record, start = (first[0], first[2]) if first else (self._record, self._start)
        return {"record": int(record), "start": int(start), "skipped": dict(sorted(self.skipped.items()))}

    def set_state(self, state: Mapping) -> None:
        self._record, self._start = int(state["record"]), int(state["start"])
        self.skipped = collections.Counter(state["skipped"])
        self._reader = None  # opened at the next batch, at that record
        self._ready = collections.deque()  # planned rows, each a list of (record, document, start, end)
        self._row, self._used = [], np.zeros_like(self._limit)  # the row being planned and its usage

    def __iter__(self) -> MMStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self._per_host)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def _next_row(self) -> dict[str, np.ndarray]:
        """Plan as plan_rows does, one document at a time, until a row is complete; build it."""
        while not self._ready:
            index, document = self._next_document()
            pieces = split_points(document, self._budget.seq_len)
            if index == self._record:  # the first document after set_state: resume at its piece
                pieces = [piece for piece in pieces if piece[0] >= self._start]
            if self._row and np.any(self._used + usage(document, 0, len(document.ids)) > self._limit):
                self._ready.append(self._row)
                self._row, self._used = [], np.zeros_like(self._limit)
            self._ready.extend([(index, document, start, end)] for start, end in pieces[:-1])
            start, end = pieces[-1]
            self._row.append((index, document, start, end))
            self._used += usage(document, start, end)
        pieces = self._ready.popleft()
        return build_row([document for _, document, _, _ in pieces],
                         tuple((k, start, end) for k, (_, _, start, end) in enumerate(pieces)),
                         self._config, self._budget, pad_id=self._pad)

    def _next_document(self) -> tuple[int, TokenizedDocument]:
        """(index, document) of the next train document, counting the bad records on the way."""
        if self._reader is None:
            self._reader = DocumentReader(
                self._documents, self._record, self.skipped, give_up_after=self._give_up_after,
                nothing_found=f"the data sources hold no train document in {self._give_up_after} records",
                threads=READ_THREADS, prefetch=PREFETCH_DOCUMENTS)
        return self._reader.next()

    def close(self) -> None:
        self._reader = None


def mm_stream_eval_batches(groups: Mapping[str, RecordIndex], tokenizer: Tokenizer, config: ModelConfig,
                           budget: RowBudget, *, batch_size: int, max_batches: int, strict: bool = False,
                           process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Eval batches as the in-memory pipeline makes them, from the first held-out documents of each
    group (at most 4 per eval row wanted of each: enough rows without reading a whole corpus)."""
    wanted = 4 * max_batches * batch_size
    held_out = []
    for name in ("videos", "images", "text"):  # the in-memory pipeline's order
        records, found = groups.get(name), []
        for index in range(len(records) if records is not None else 0):
            item = records[index]
            if name != "text" and not media_held_out(*item[:2]):
                continue  # decided before decoding anything
            document = read_document(item, strict)
            if document is not None and (name != "text" or is_held_out(document)):
                found.append(document)
            if len(found) == wanted:
                break
        held_out += found
    if not held_out:
        raise ConfigError("the data sources hold no document held out for eval: add documents")
    corpus = pack_mm_corpus(tokenizer, held_out, config, seq_len=budget.seq_len, max_patches=budget.max_patches,
                            max_images=budget.max_images, max_video_patches=budget.max_video_patches,
                            max_videos=budget.max_videos, strict=strict)
    return make_mm_eval_batches(corpus, batch_size=batch_size, max_batches=max_batches,
                                process_index=process_index, process_count=process_count)


def mm_groups(text_sources, image_sources, video_sources, images: ImageProcessorConfig,
              videos: VideoProcessorConfig) -> dict[str, RecordIndex]:
    """The record indexes of config.data's text, image and video sources."""
    return {"text": text_records(text_sources),
            "images": media_records("image_sources", image_sources, images, videos),
            "videos": media_records("video_sources", video_sources, images, videos)}
