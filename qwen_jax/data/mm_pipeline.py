"""The image/video-text Grain pipeline: a weighted mixture of packed sources, sharded per host, resumable.

Tokenising and planning the rows happens once in memory (`pack_mm_corpus`); a row's arrays are
built when Grain reads it, in worker processes if asked, so the padded pixels of every row never
sit in memory at once. All transformations are random access (MapDataset), so the iterator state
is the index of the next batch: small, JSON-serialisable, and independent of the worker count.
With workers the program's main module must be import-safe (`if __name__ == "__main__":`), as
for any spawned process.

A row (keys `MM_ROW_KEYS`; a batch adds a leading [B]):
    input_ids      int32   [T]        pad_id after the last piece
    targets        int32   [T]        input_ids shifted left by one, pad_id last
    segment_ids    int32   [T]        1, 2, ... per document piece, 0 on padding
    positions      int32   [3, T]     rope_index of the row with its segment ids: (t, h, w) from 0
                                      at every piece (and the padding), as if each piece stood alone
    loss_mask      float32 [T]        1 where the target is a text token (or eos) of the same piece;
                                      0 where it is vision_start, image_pad or vision_end (images
                                      are given, never generated), across a piece's end, on padding
    pixel_values   float32 [P, D]     the row's images' patch rows in order, then zero rows
    image_grid_thw int32   [I, 3]     the row's images' (t, h, w) in order, then (0, 0, 0) rows
    num_images     int32   []         how many image_grid_thw rows are real
and with a video budget (`VIDEO_ROW_KEYS`), the same for videos:
    pixel_values_videos float32 [Pv, D], video_grid_thw int32 [V, 3], num_videos int32 []
The padding grids (0, 0, 0) cover no patches and no tokens; the padding patches are the rows past
sum(t * h * w). loss_mask is 0 for targets inside a block: a video's timestamp text is given too.
The model takes a batch's pixels and grids as they are (per-row images and videos);
`vision_tower_inputs` turns a batch into HF's flat layout.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

from absl import flags

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ModelConfig
from qwen_jax.data.mm_packing import (
    Piece,
    RowBudget,
    TokenizedDocument,
    budget_problem,
    build_row,
    check_vision_tokens,
    plan_rows,
    tokenize_record,
)
from qwen_jax.data.pipeline import eval_batch_starts, per_host_batch_size
from qwen_jax.data.records import Skip
from qwen_jax.data.tokenizer import eos_id, pad_id
from qwen_jax.model.vlm import vision_tower_inputs  # noqa: F401 - the batch's reader, re-exported

MM_ROW_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask", "pixel_values",
               "image_grid_thw", "num_images")
VIDEO_ROW_KEYS = ("pixel_values_videos", "video_grid_thw", "num_videos")


@dataclasses.dataclass(frozen=True)
class MMPackedCorpus:
    """Tokenised documents, the pieces of each row, and the records skipped on the way by reason."""

    documents: tuple[TokenizedDocument, ...]
    rows: tuple[tuple[Piece, ...], ...]
    skipped: dict[str, int]
    config: ModelConfig  # vision token ids, merge size and patch_dim; rope_index's config
    budget: RowBudget
    pad_id: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def seq_len(self) -> int:
        return self.budget.seq_len

    @property
    def row_keys(self) -> tuple[str, ...]:
        """The keys of a row: MM_ROW_KEYS, and VIDEO_ROW_KEYS with a video budget."""
        return MM_ROW_KEYS + (VIDEO_ROW_KEYS if self.budget.max_video_patches else ())

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` as arrays (see the module docstring)."""
        return build_row(self.documents, self.rows[index], self.config, self.budget,
                         pad_id=self.pad_id)


def _check_budgets(config: ModelConfig, seq_len: int, max_patches: int,
                   max_video_patches: int) -> None:
    """The row sizes must work with the model: whole merge blocks of patches."""
    if config.vision is None:
        raise ValueError("the image-text pipeline needs a model config with a vision tower")
    blocks = config.vision.spatial_merge_size**2
    if seq_len < 2 or max_patches < blocks or max_patches % blocks:
        raise ValueError(f"seq_len ({seq_len}) must be >= 2 and max_patches ({max_patches}) a "
                         f"positive multiple of spatial_merge_size^2 = {blocks}")
    if max_video_patches < 0 or max_video_patches % blocks:
        raise ValueError(f"max_video_patches ({max_video_patches}) must be 0 (no videos) or a "
                         f"positive multiple of spatial_merge_size^2 = {blocks}")


def row_budget(config: ModelConfig, seq_len: int, max_patches: int, max_images: int | None = None,
               max_video_patches: int = 0, max_videos: int | None = None) -> RowBudget:
    """A row's budget, checked against the model (images and videos default to one per merge block)."""
    _check_budgets(config, seq_len, max_patches, max_video_patches)
    blocks = config.vision.spatial_merge_size**2
    return RowBudget(seq_len, max_patches, max_patches // blocks if max_images is None else max_images,
                     max_video_patches, max_video_patches // blocks if max_videos is None else max_videos)


def pack_mm_corpus(tokenizer: Tokenizer, documents: list, config: ModelConfig, *, seq_len: int,
                   max_patches: int, max_images: int | None = None, max_video_patches: int = 0,
                   max_videos: int | None = None, strict: bool = False) -> MMPackedCorpus:
    """Tokenise str / ImageTextRecord documents (skipping and counting bad ones; strict: raising
    ValueError("<source>: <reason>") on the first) and plan rows of seq_len tokens, at most
    max_patches image patches and max_images images (default: one per merge block), and
    max_video_patches video patches and max_videos videos (0: rows without video arrays; a
    document with a video is then skipped as too_many_video_patches)."""
    budget = row_budget(config, seq_len, max_patches, max_images, max_video_patches, max_videos)
    check_vision_tokens(tokenizer, config)
    eos = eos_id(tokenizer)
    if eos is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to end documents with")
    kept, skipped = [], collections.Counter()
    for index, record in enumerate(documents):
        try:
            document = tokenize_record(tokenizer, record, config, eos)
            problem = budget_problem(document, budget)
        except Skip as skip:
            problem = skip.reason
        if not problem:
            kept.append(document)
        elif strict:
            raise ValueError(f"{getattr(record, 'source', f'document {index}')}: {problem}")
        else:
            skipped[problem] += 1
    if not kept:
        raise ValueError(f"no usable documents among {len(documents)} (skipped: {dict(skipped)})")
    rows = plan_rows(kept, budget)
    padding = pad_id(tokenizer)
    return MMPackedCorpus(tuple(kept), tuple(rows), dict(sorted(skipped.items())), config, budget,
                          eos if padding is None else padding)


class _PlannedRows:
    """Random access to a corpus's rows, built on read (in the worker that reads them)."""

    def __init__(self, corpus: MMPackedCorpus):
        self._corpus = corpus

    def __len__(self) -> int:
        return self._corpus.num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._corpus.row(index)


def _same_row_shapes(corpora: Mapping[str, MMPackedCorpus]) -> None:
    """Rows of every source must stack into one batch shape (one compiled step)."""
    shapes = {name: (*c.budget, c.config.vision.patch_dim) for name, c in corpora.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"sources differ in ({', '.join(RowBudget._fields)}, patch_dim): {shapes}")


class MMBatchIterator:
    """Batches of a MapDataset, built by `worker_count` processes (0: in this one); the state is
    {"next_index": batches taken}, the same whatever the worker count, so a resumed run may use
    another (Grain's own multiprocess state records one entry per worker)."""

    def __init__(self, batches: grain.MapDataset, worker_count: int):
        self._batches = batches
        self._worker_count = worker_count
        self._next_index = 0
        self._iterator = None  # started on the first `next`: processes only when batches are read

    def __iter__(self) -> MMBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            # No reading threads: building a row is Python and numpy under the GIL; processes
            # scale.
            iterable = self._batches[self._next_index:].to_iter_dataset(
                grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            if self._worker_count:
                _let_grain_read_its_flags()
                iterable = iterable.mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=self._worker_count))
            self._iterator = iter(iterable)
        batch = next(self._iterator)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.close()
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        """Stop the worker processes (if any); the next `next` starts them again."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def _let_grain_read_its_flags() -> None:
    """Grain 0.2.18's mp_prefetch reads an absl flag and fails in programs that never parsed absl
    flags (google/grain#1355); their defaults are what it should read."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_mm_train_iterator(corpora: Mapping[str, MMPackedCorpus], *, global_batch_size: int,
                           seed: int, weights: Mapping[str, float] | None = None,
                           process_index: int = 0, process_count: int = 1,
                           worker_count: int = 0) -> MMBatchIterator:
    """This host's endless batches {key: [global_batch_size // process_count, ...]} (MM_ROW_KEYS).

    Each source's rows are shuffled (anew each epoch) and repeated; the sources are interleaved
    in the proportions of `weights` (default equal) by Grain's deterministic mixing: shares of
    rows, and rows are full, so roughly of tokens. Hosts split each global batch as
    `make_train_iterator` does: host p gets its p-th contiguous block. Resume with `get_state()` /
    `set_state()`.
    """
    if not corpora:
        raise ValueError("no sources to mix")
    _same_row_shapes(corpora)
    names = sorted(corpora)  # a fixed order: the mixture must not depend on dict insertion order
    weights = weights or {name: 1.0 for name in names}
    if set(weights) != set(names) or min(weights.values()) <= 0:
        raise ValueError(f"weights {dict(weights)} must be positive, one per source {names}")
    per_host = per_host_batch_size(global_batch_size, process_count)
    # Distinct seeds: two sources of equal length must not be shuffled alike.
    sources = [grain.MapDataset.source(_PlannedRows(corpora[name]))
               .shuffle(seed + 7919 * k)  # the epoch is folded in: a new order each epoch
               .repeat() for k, name in enumerate(names)]
    mixed = (sources[0] if len(sources) == 1
             else grain.MapDataset.mix(sources, [weights[name] for name in names]))
    batches = (mixed.batch(per_host, drop_remainder=True)
               # Blocks of `per_host` rows; global batch s is blocks s*P .. s*P + P - 1.
               [process_index::process_count])
    return MMBatchIterator(batches, worker_count)


def make_mm_eval_batches(corpus: MMPackedCorpus, *, batch_size: int, max_batches: int | None = None,
                         process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The first rows in corpus order as fixed batches (MM_ROW_KEYS, [batch_size // process_count,
    ...]); the last batch is topped up with rows from the start whose loss_mask is 0, so every
    batch has one shape. Hosts split each batch as the train iterator does."""
    per_host, starts = eval_batch_starts(corpus.num_rows, batch_size=batch_size,
                                         max_batches=max_batches, process_index=process_index,
                                         process_count=process_count)
    batches = []
    for start in starts:
        rows = []
        for position in range(start, start + per_host):
            row = corpus.row(position % corpus.num_rows)
            if position >= corpus.num_rows:  # a filler: seen by the model, never scored
                row["loss_mask"] = np.zeros_like(row["loss_mask"])
            rows.append(row)
        batches.append({key: np.stack([row[key] for row in rows]) for key in corpus.row_keys})
    return batches
