"""Text corpora bigger than memory: records are read, tokenised and packed while training runs.

Grain sees every record of the sources by index (a line index per JSONL file, ArrayRecord's own
index, one document per .txt file, the built-in corpus in memory), shuffles them in a new order
each epoch, gives host p every P-th record, and parses and tokenises ahead in a background thread
(the thread works while the main one waits on the accelerator). `TextStream` packs the tokens with
`pack_documents`' concatenate-then-cut rule. Its state is the record the next row continues, how
many of that record's tokens are used, and the skip counts: a few numbers, enough to resume exactly.

Held-out documents are those `split_documents` holds out (a hash of the text), so the train stream
never sees an eval document and the eval batches equal the in-memory pipeline's. `RecordIndex`
serves the image-text stream too (mm_streaming.py).
"""

from __future__ import annotations

import bisect
import collections
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError
from qwen_jax.data.packing import row_fields
from qwen_jax.data.pipeline import Batch, make_eval_batches, pack_corpus, per_host_batch_size
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import HELD_OUT_FRACTION, is_held_out, python_docs_corpus
from qwen_jax.data.text_sources import TEXT_FILE_SUFFIXES, file_text, json_text
from qwen_jax.data.tokenizer import eos_id, pad_id

PREFETCH_RECORDS = 256  # records parsed and tokenised ahead of the packer
TOKENIZER_SAMPLE_CHARS = 20_000_000  # text a tokenizer is trained on when the run trains its own
INDEX_BLOCK_BYTES = 1 << 24
PASSED_OVER = ""  # what a stream's reader gives for a record that is no train document (blank, held out)


def jsonl_line_starts(path: Path) -> np.ndarray:
    """Byte offsets [lines + 1] of a file's lines: line i is bytes [starts[i], starts[i + 1])."""
    starts, size = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as file:
        while block := file.read(INDEX_BLOCK_BYTES):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + size + 1)
            size += len(block)
    starts = np.concatenate(starts)
    return starts if starts[-1] == size else np.append(starts, size)  # a last line without "\n"


def _memory_text(record: str, where: str) -> str:
    """A document held in memory, or raise Skip."""
    if not record.strip():
        raise Skip("empty_document", "no text but whitespace")
    return record


def _no_text(record: bytes, where: str) -> None:
    """A JSONL file's blank line holds no record (as the in-memory reader has it): passed over, not counted."""
    return None


class RecordIndex:
    """Every record of the sources of config.data.<field> by index, in source order: (where, record,
    parse), parse(record, where) giving the document (None: no record, e.g. a blank line) or raising
    Skip. A source is a built-in name (`built_in`: name -> (records in memory, their parse)), or a
    file: JSONL and ArrayRecord records parse with `json_parser(path)`, a .txt file is one text."""

    def __init__(self, field: str, sources: Sequence[str], built_in: Mapping[str, tuple[Callable, Callable]],
                 json_parser: Callable[[Path], Callable], suffixes: tuple[str, ...]):
        self._parts, sizes = [], []  # (kind, name, content, parse) and its record count, per source
        for source in sources:
            path = Path(source)
            if source in built_in:
                load, parse = built_in[source]
                records = load()
                self._parts.append(("memory", source, records, parse))
                sizes.append(len(records))
                continue
            if not source.endswith(suffixes):
                raise ConfigError(f"data.{field} entry {source!r} is neither one of {sorted(built_in)} nor a "
                                  f"{' / '.join(suffixes)} file")
            if not path.is_file():
                raise FileNotFoundError(f"data.{field}: {path} does not exist")
            if path.suffix == ".jsonl":
                starts = jsonl_line_starts(path)
                self._parts.append(("jsonl", path, starts, json_parser(path)))
                sizes.append(len(starts) - 1)
            elif path.suffix == ".array_record":
                shard = grain.sources.ArrayRecordDataSource([str(path)])
                self._parts.append(("array_record", path, shard, json_parser(path)))
                sizes.append(len(shard))
            else:
                self._parts.append(("txt", path, None, file_text))
                sizes.append(1)
        self._ends = np.cumsum(sizes).tolist()
        self._files: dict[Path, int] = {}  # descriptors, opened on first read

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> tuple[str, object, Callable]:
        part = bisect.bisect_right(self._ends, index)
        kind, path, content, parse = self._parts[part]
        local = index - (self._ends[part - 1] if part else 0)
        if kind in ("memory", "array_record"):
            return f"{path}[{local}]", content[local], parse
        if kind == "txt":
            return str(path), path.read_bytes(), parse
        start, end = int(content[local]), int(content[local + 1])
        line = os.pread(self._descriptor(path), end - start, start)
        return f"{path}:{local + 1}", line, parse if line.strip() else _no_text

    def _descriptor(self, path: Path) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]


def text_records(sources: Sequence[str]) -> RecordIndex:
    """The records of config.data.text_sources: "python_docs", .jsonl / .array_record of {"text": ...}, .txt."""
    return RecordIndex("text_sources", sources, {"python_docs": (python_docs_corpus, _memory_text)},
                       lambda path: json_text, TEXT_FILE_SUFFIXES)


def texts_of(records: RecordIndex, *, held_out: bool, strict: bool, max_chars: int | None = None):
    """The good documents of one side of the split in corpus order (up to about `max_chars`)."""
    chars = 0
    for index in range(len(records)):
        text = read_document(records[index], strict)
        if text is None or is_held_out(text) != held_out:
            continue
        yield text
        chars += len(text)
        if max_chars is not None and chars >= max_chars:
            return


def read_document(item, strict: bool):
    """A record's document (a text, or an image-text record), or None where it is blank or bad
    (strict: a bad one raises ValueError naming it)."""
    try:
        return item[2](item[1], item[0])
    except Skip as skip:
        if strict:
            raise skip.at(item[0]) from None
        return None


class DocumentReader:
    """The documents of an endless MapDataset of (document | skip reason | PASSED_OVER) from index
    `start` on, read ahead in background threads; next() -> (index, document), counting the bad
    records in `skipped`. Items are never None: Grain drops those, and the indexes would slip."""

    def __init__(self, items: grain.MapDataset, start: int, skipped: collections.Counter, *,
                 give_up_after: int, nothing_found: str, threads: int = 1, prefetch: int = PREFETCH_RECORDS):
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._items = iter(items[start:].to_iter_dataset(options))
        self._next_index, self._skipped = start, skipped
        self._give_up_after, self._nothing_found = give_up_after, nothing_found

    def next(self):
        for _ in range(self._give_up_after):
            item = next(self._items)
            index, self._next_index = self._next_index, self._next_index + 1
            if not isinstance(item, str):
                return index, item
            if item != PASSED_OVER:
                self._skipped[item] += 1
        raise ConfigError(f"{self._nothing_found} (skipped: {dict(self._skipped)}; the rest blank or held "
                          "out for eval)")


class TokenizeRecord:
    """A record -> its token ids (int32, eos appended); PASSED_OVER where it is held out or blank;
    the reason, where it is bad (strict: raise ValueError naming it)."""

    def __init__(self, tokenizer: Tokenizer, strict: bool):
        self._tokenizer = tokenizer
        self._eos = eos_id(tokenizer)
        self._strict = strict

    def __call__(self, item) -> np.ndarray | str:
        where, record, parse = item
        try:
            text = parse(record, where)
            if text is None or is_held_out(text):
                return PASSED_OVER
            try:
                ids = self._tokenizer.encode(text).ids
            except Exception:  # the tokenizer's error types are undocumented; any one record may fail
                raise Skip("encode_error", "the tokenizer failed on it") from None
        except Skip as skip:
            if self._strict:
                raise skip.at(where) from None
            return skip.reason
        return np.asarray([*ids, self._eos], np.int32)


def host_records(records: RecordIndex, field: str, seed: int | None, process_index: int,
                 process_count: int) -> grain.MapDataset:
    """Host p's endless (where, record, parse) items: every P-th of the records, shuffled with `seed`
    anew each epoch (None: in order)."""
    if not len(records):
        raise ConfigError(f"data.{field} hold no records")
    items = grain.MapDataset.source(records)
    if seed is not None:
        items = items.shuffle(seed)  # the epoch is folded into the seed: a new order each
    return items.repeat()[process_index::process_count]


class TextStream:
    """Endless batches {key: [global_batch_size // process_count, seq_len]} of packed train rows.

    Records come shuffled with `seed` (a new order each epoch; None: corpus order), host p reading
    every P-th. `skipped` counts the bad records read so far by reason (once per epoch each).
    Resume with `get_state()` / `set_state()`."""

    def __init__(self, records: RecordIndex, tokenizer: Tokenizer, *, seq_len: int,
                 global_batch_size: int, seed: int | None, strict: bool = False,
                 process_index: int = 0, process_count: int = 1):
        self._documents = host_records(records, "text_sources", seed, process_index, process_count).map(
            TokenizeRecord(tokenizer, strict))
        self._records_per_epoch = -(-len(records) // process_count)
        self._per_host = per_host_batch_size(global_batch_size, process_count)
        self._seq_len = seq_len
        self._pad = pad_id(tokenizer)
        self.set_state({"record": 0, "offset": 0, "skipped": {}})

    def get_state(self) -> dict:
        """{"record": the document the next row continues, "offset": its tokens used, "skipped": ...}."""
        return {"record": self._record, "offset": self._offset, "skipped": dict(sorted(self.skipped.items()))}

    def set_state(self, state: dict) -> None:
        self._record, self._offset = int(state["record"]), int(state["offset"])
        self.skipped = collections.Counter(state["skipped"])
        self._document = None  # read again on the next batch
        self._reader = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> Batch:
        if self._document is None:  # start (or resume) reading at the current record
            self._reader = DocumentReader(
                self._documents, self._record, self.skipped, give_up_after=self._records_per_epoch + 1,
                nothing_found="data.text_sources: a whole epoch of records holds no train document")
            offset = self._offset
            self._take_next_document()
            self._offset = offset  # 0 unless resumed inside that document
        tokens = np.empty((self._per_host, self._seq_len), np.int32)
        segments = np.empty_like(tokens)
        for row in range(self._per_host):
            filled, segment = 0, 0
            while filled < self._seq_len:
                if self._offset == len(self._document):
                    self._take_next_document()
                take = min(self._seq_len - filled, len(self._document) - self._offset)
                segment += 1
                tokens[row, filled:filled + take] = self._document[self._offset:self._offset + take]
                segments[row, filled:filled + take] = segment
                filled += take
                self._offset += take
        return row_fields(tokens, segments, self._pad)

    def _take_next_document(self) -> None:
        """Read on to the next train document."""
        self._record, self._document = self._reader.next()
        self._offset = 0

    def close(self) -> None:
        self._reader = None


def stream_eval_batches(records: RecordIndex, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                        max_batches: int, strict: bool = False, process_index: int = 0,
                        process_count: int = 1) -> list[Batch]:
    """The in-memory pipeline's eval batches, from only as many held-out documents as they need."""
    needed, texts = max_batches * batch_size * seq_len, []
    for text in texts_of(records, held_out=True, strict=strict):
        texts.append(text)
        needed -= len(tokenizer.encode(text).ids) + 1
        if needed <= 0:
            break
    if not texts:
        raise ConfigError("data.text_sources hold no document held out for eval (one in "
                          f"{round(1 / HELD_OUT_FRACTION)} is, by a hash of its text): add documents")
    held_out = pack_corpus(tokenizer, texts, seq_len=seq_len)
    return make_eval_batches(held_out, batch_size=batch_size, max_batches=max_batches,
                             process_index=process_index, process_count=process_count)
