"""Chat data for supervised fine-tuning, read as training goes: conversations shuffled each epoch,
rendered and tokenised ahead in a background thread, and packed whole into rows.

A row holds whole conversations (first fit over the batch's rows; the batch is done when the next
conversation fits in none of them), so no turn loses the context it answers. The loss mask keeps
the tokens `TokenizeConversation` marks as trained. The stream's state is the conversation that
opens the next batch and the skip counts: enough to resume exactly, as `TextStream`'s.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from qwen_jax.config import ConfigError
from qwen_jax.data.conversations import (ChatRenderer, TokenizeConversation, check_conversation,
                                         is_held_out_conversation, parse_conversation,
                                         python_help_conversations)
from qwen_jax.data.packing import row_fields
from qwen_jax.data.pipeline import Batch, per_host_batch_size
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import HELD_OUT_FRACTION
from qwen_jax.data.streaming import PASSED_OVER, DocumentReader, RecordIndex, host_records, read_document

CHAT_FILE_SUFFIXES = (".jsonl", ".array_record")


def _memory_conversation(record: dict, where: str) -> dict:
    return check_conversation(record)


def chat_records(sources: Sequence[str]) -> RecordIndex:
    """The records of config.data.chat_sources: "python_help", .jsonl / .array_record of {"messages": ...}."""
    return RecordIndex("chat_sources", sources, {"python_help": (python_help_conversations, _memory_conversation)},
                       lambda path: parse_conversation, CHAT_FILE_SUFFIXES)


def conversations_of(records: RecordIndex, *, held_out: bool, strict: bool):
    """(where, conversation) of the good conversations of one side of the split, in corpus order."""
    for index in range(len(records)):
        item = records[index]
        conversation = read_document(item, strict)
        if conversation is not None and is_held_out_conversation(conversation, HELD_OUT_FRACTION) == held_out:
            yield item[0], conversation


def rendered_texts(records: RecordIndex, renderer: ChatRenderer, *, strict: bool, max_chars: int):
    """The train conversations as the template writes them (up to about `max_chars`), to train a tokenizer on."""
    chars = 0
    for _, conversation in conversations_of(records, held_out=False, strict=strict):
        try:
            text = renderer.render(conversation["messages"], conversation["tools"])
        except Exception:  # noqa: BLE001 - the stream counts it as template_error; here it is just left out
            continue
        yield text
        chars += len(text)
        if chars >= max_chars:
            return


class ConversationRows:
    """Rows [R, seq_len] filled with whole conversations, each in the first row with room for it."""

    def __init__(self, rows: int, seq_len: int, pad: int):
        self._tokens = np.full((rows, seq_len), pad, np.int32)
        self._trained = np.zeros((rows, seq_len), bool)
        self._segments = np.zeros((rows, seq_len), np.int32)
        self.filled = np.zeros(rows, np.int64)
        self._pad, self.empty = pad, True

    def add(self, ids: np.ndarray, trained: np.ndarray) -> bool:
        """Place one conversation; False where no row has room for it."""
        room = np.flatnonzero(self._tokens.shape[1] - self.filled >= len(ids))
        if not len(room):
            return False
        self.place(room[0], ids, trained)
        return True

    def room(self, row: int) -> int:
        """Tokens still free in `row`."""
        return self._tokens.shape[1] - self.filled[row]

    def place(self, row: int, ids: np.ndarray, trained: np.ndarray) -> None:
        """Append one conversation to `row` (which has room) as its next segment."""
        start = self.filled[row]
        self._tokens[row, start:start + len(ids)] = ids
        self._trained[row, start:start + len(ids)] = trained
        self._segments[row, start:start + len(ids)] = self._segments[row].max() + 1
        self.filled[row] += len(ids)
        self.empty = False

    def batch(self) -> Batch:
        """The `ROW_KEYS` fields; the loss at t (predicting token t + 1) counts where that token is trained."""
        fields = row_fields(self._tokens, self._segments, self._pad)
        next_trained = np.concatenate([self._trained[:, 1:], np.zeros((len(self._tokens), 1), bool)], axis=1)
        fields["loss_mask"] = fields["loss_mask"] * next_trained
        return fields


class TokenizeChatRecord:
    """A record -> (ids, trained) of a train conversation; PASSED_OVER where it is held out or blank;
    the reason, where it is bad (strict: raise ValueError naming it)."""

    def __init__(self, tokenize: TokenizeConversation, strict: bool):
        self._tokenize, self._strict = tokenize, strict

    def __call__(self, item):
        where, record, parse = item
        try:
            conversation = parse(record, where)
            if conversation is None or is_held_out_conversation(conversation, HELD_OUT_FRACTION):
                return PASSED_OVER
            return self._tokenize(conversation)
        except Skip as skip:
            if self._strict:
                raise skip.at(where) from None
            return skip.reason


class ChatStream:
    """Endless batches {key: [global_batch_size // process_count, seq_len]} of whole train conversations.

    Records come shuffled with `seed` (a new order each epoch; None: corpus order), host p reading
    every P-th. `skipped` counts the bad records read so far by reason (once per epoch each).
    Resume with `get_state()` / `set_state()`."""

    def __init__(self, records: RecordIndex, tokenize: TokenizeConversation, *, pad: int, global_batch_size: int,
                 seed: int | None, strict: bool = False, process_index: int = 0, process_count: int = 1,
                 packing=ConversationRows):
        self._packing = packing  # (rows, seq_len, pad) -> what packs tokenize's items (preferences.py: pairs)
        self._conversations = host_records(records, "chat_sources", seed, process_index, process_count).map(
            TokenizeChatRecord(tokenize, strict))
        self._records_per_epoch = -(-len(records) // process_count)
        self._per_host = per_host_batch_size(global_batch_size, process_count)
        self._seq_len, self._pad = tokenize.seq_len, pad
        self.set_state({"record": 0, "skipped": {}})

    def get_state(self) -> dict:
        """{"record": the conversation that opens the next batch, "skipped": counts by reason}."""
        return {"record": self._record, "skipped": dict(sorted(self.skipped.items()))}

    def set_state(self, state: dict) -> None:
        self._record = int(state["record"])
        self.skipped = collections.Counter(state["skipped"])
        self._reader, self._pending = None, None  # read again from the record on the next batch

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> Batch:
        if self._reader is None:
            self._reader = DocumentReader(
                self._conversations, self._record, self.skipped, give_up_after=self._records_per_epoch + 1,
                nothing_found="data.chat_sources: a whole epoch of records holds no usable train conversation")
        rows = self._packing(self._per_host, self._seq_len, self._pad)
        while True:
            if self._pending is None:
                self._record, self._pending = self._reader.next()
            if not rows.add(*self._pending):
                return rows.batch()  # the pending conversation opens the next batch
            self._pending = None

    def close(self) -> None:
        self._reader = None


def chat_eval_batches(records: RecordIndex, tokenize: TokenizeConversation, *, pad: int, batch_size: int,
                      max_batches: int, strict: bool = False, process_index: int = 0,
                      process_count: int = 1, packing=ConversationRows) -> list[Batch]:
    """Fixed batches of the held-out conversations in corpus order, packed as the train ones (`packing`, as
    ChatStream's); host p takes the p-th block of rows of each."""
    per_host, seq_len = per_host_batch_size(batch_size, process_count), tokenize.seq_len
    batches, rows = [], packing(batch_size, seq_len, pad)
    for where, conversation in conversations_of(records, held_out=True, strict=strict):
        try:
            item = tokenize(conversation)
        except Skip as skip:  # counted where the train stream meets it; eval leaves it out
            if strict:
                raise skip.at(where) from None
            continue
        if not rows.add(*item):
            batches.append(rows.batch())
            if len(batches) == max_batches:
                break
            rows = packing(batch_size, seq_len, pad)
            rows.add(*item)
    else:
        if not rows.empty:
            batches.append(rows.batch())
    if not batches:
        raise ConfigError("data.chat_sources hold no usable conversation held out for eval (one in "
                          f"{round(1 / HELD_OUT_FRACTION)} is, by a hash of its content): add conversations")
    block = slice(process_index * per_host, (process_index + 1) * per_host)
    return [{key: value[block] for key, value in batch.items()} for batch in batches]
