"""Grain pipelines: tokenise and pack once in memory, then shuffle, repeat, shard per host and batch.

The packed rows live in host memory (the corpus is a few MB), so the Grain iterator's state is only
the index of the next batch: small, JSON-serialisable, and enough to resume exactly.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen_jax.data.packing import ROW_KEYS, pack_documents
from qwen_jax.data.tokenizer import eos_id, pad_id

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PackedCorpus:
    """Packed rows [num_rows, seq_len] per `ROW_KEYS`, and what was skipped on the way, by reason."""

    rows: dict[str, np.ndarray]
    skipped: dict[str, int]
    num_documents: int  # documents kept
    num_tokens: int  # their tokens, eos included (padding excluded)
    pad_id: int

    @property
    def num_rows(self) -> int:
        return len(self.rows["input_ids"])

    @property
    def seq_len(self) -> int:
        return self.rows["input_ids"].shape[1]


def tokenize_documents(tokenizer: Tokenizer,
                       documents: list[Any]) -> tuple[list[np.ndarray], dict[str, int]]:
    """Token ids (int32) of each usable document, and counts of the skipped ones by reason.

    Reasons: "not_text" (not a str), "empty" (only whitespace), "encode_error" (the tokenizer
    raised, e.g. on a lone surrogate). One bad record must never stop a run.
    """
    token_ids, skipped = [], collections.Counter()
    for document in documents:
        if not isinstance(document, str):
            skipped["not_text"] += 1
        elif not document.strip():
            skipped["empty"] += 1
        else:
            try:
                token_ids.append(np.asarray(tokenizer.encode(document).ids, np.int32))
            except Exception:  # the tokenizer's error types are undocumented; any one record may fail
                skipped["encode_error"] += 1
    return token_ids, dict(sorted(skipped.items()))


def pack_corpus(tokenizer: Tokenizer, documents: list[Any], *, seq_len: int) -> PackedCorpus:
    """Tokenise `documents` (skipping bad ones) and pack them into rows of `seq_len` tokens."""
    token_ids, skipped = tokenize_documents(tokenizer, documents)
    if not token_ids:
        raise ValueError(f"no usable documents among {len(documents)} (skipped: {skipped})")
    rows = pack_documents(token_ids, seq_len=seq_len, eos_id=eos_id(tokenizer),
                          pad_id=pad_id(tokenizer))
    return PackedCorpus(rows=rows, skipped=skipped, num_documents=len(token_ids),
                        num_tokens=sum(len(ids) + 1 for ids in token_ids),
                        pad_id=pad_id(tokenizer))


class _RowSource:
    """Random access to packed rows as dicts of [seq_len] arrays, the element type Grain batches."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows["input_ids"])

    def __getitem__(self, index: int) -> Batch:
        return {key: self._rows[key][index] for key in ROW_KEYS}


def per_host_batch_size(batch_size: int, process_count: int) -> int:
    """Each host's share of a global batch; hosts must get equal shares for one global shape."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    return batch_size // process_count


def make_train_iterator(corpus: PackedCorpus, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Endless batches {key: [global_batch_size // process_count, seq_len]} for this host.

    Rows are shuffled with `seed` and re-shuffled each epoch; an epoch's tail and the next epoch's
    head share a batch so no row is dropped. Global batch s is rows [s*B, (s+1)*B) of that stream
    and host p gets its p-th contiguous block, so concatenating the hosts' batches in process order
    gives exactly the single-process batch. Resume with `get_state()` / `set_state()`.
    """
    per_host = per_host_batch_size(global_batch_size, process_count)
    dataset = (grain.MapDataset.source(_RowSource(corpus.rows))
               .shuffle(seed)  # the epoch number is folded into the seed: a new order each epoch
               .repeat()
               # Blocks of `per_host` rows; global batch s is blocks s*P .. s*P + P - 1.
               .batch(per_host, drop_remainder=True)
               [process_index::process_count])
    # The rows are in memory: reading threads would only contend for the GIL.
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(dataset.to_iter_dataset(read_options))


def eval_batch_starts(num_rows: int, *, batch_size: int, max_batches: int | None,
                      process_index: int, process_count: int) -> tuple[int, list[int]]:
    """(rows per host, this host's first row of each eval batch): the first rows in corpus order,
    at most max_batches batches, host p taking the p-th block of every batch."""
    per_host = per_host_batch_size(batch_size, process_count)
    num_batches = -(-num_rows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return per_host, [index * batch_size + process_index * per_host for index in range(num_batches)]


def make_eval_batches(corpus: PackedCorpus, *, batch_size: int, max_batches: int | None = None,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """The first rows in corpus order as fixed batches {key: [batch_size // process_count, T]}.

    The last batch is filled with padding rows (loss_mask 0) so every batch has one shape and one
    compiled eval step; sharding across hosts follows `make_train_iterator`.
    """
    per_host, starts = eval_batch_starts(corpus.num_rows, batch_size=batch_size,
                                         max_batches=max_batches, process_index=process_index,
                                         process_count=process_count)
    batches = []
    for start in starts:
        batch = {key: corpus.rows[key][start:start + per_host] for key in ROW_KEYS}
        missing = per_host - len(batch["input_ids"])
        if missing:
            fill = {"input_ids": corpus.pad_id, "targets": corpus.pad_id, "segment_ids": 0,
                    "loss_mask": 0}
            batch = {key: np.concatenate([value, np.full((missing, corpus.seq_len), fill[key],
                                                         value.dtype)])
                     for key, value in batch.items()}
        batches.append(batch)
    return batches
