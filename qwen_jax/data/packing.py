"""Pack tokenised documents into fixed-length rows with segment ids and a next-token loss mask (numpy).

Rule (concatenate then cut): documents, each followed by eos, are laid end to end in corpus order
and the stream is cut every `seq_len` tokens. A document that does not fit in what is left of a
row fills the row and continues at the start of the next row as a new segment (it does not see its
earlier part there). Only the last row is padded, so no compute is spent on padding.
"""

from __future__ import annotations

import numpy as np

ROW_KEYS = ("input_ids", "targets", "segment_ids", "loss_mask")


def pack_documents(documents: list[np.ndarray], *, seq_len: int, eos_id: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Token-id lists -> rows [N, seq_len]: input_ids, targets, segment_ids (int32), loss_mask (f32).

    segment_ids count document pieces 1, 2, ... within a row, 0 on padding. targets[t] is
    input_ids[t + 1] (pad at the last column); loss_mask is 1 exactly where that target belongs to
    the same segment, so 0 at every segment's last token (eos or a cut) and on padding.
    """
    lengths = np.array([len(doc) + 1 for doc in documents], np.int64)  # + 1 for the eos
    stream = np.full(int(lengths.sum()), eos_id, np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for start, doc in zip(starts, documents):
        stream[start:start + len(doc)] = doc
    document_of_token = np.repeat(np.arange(len(documents)), lengths)

    num_rows = -(-len(stream) // seq_len)
    padding = num_rows * seq_len - len(stream)
    input_ids = np.pad(stream, (0, padding), constant_values=pad_id).reshape(num_rows, seq_len)
    document = np.pad(document_of_token, (0, padding), constant_values=-1).reshape(num_rows, seq_len)

    # Documents are contiguous and increasing, so a row's pieces are numbered from its first one.
    segment_ids = np.where(document >= 0, document - document[:, :1] + 1, 0).astype(np.int32)
    return row_fields(input_ids, segment_ids, pad_id)


def row_fields(input_ids: np.ndarray, segment_ids: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Rows [N, T] of tokens and their segment ids (0: padding) -> the `ROW_KEYS` fields: targets[t]
    is input_ids[t + 1] (pad at the last column), loss_mask 1 exactly where that target belongs to the
    same segment."""
    num_rows = len(input_ids)
    targets = np.concatenate([input_ids[:, 1:], np.full((num_rows, 1), pad_id, np.int32)], axis=1)
    same_segment = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
    loss_mask = np.concatenate([same_segment, np.zeros((num_rows, 1), bool)], axis=1)
    return {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids,
            "loss_mask": loss_mask.astype(np.float32)}


def unigram_entropy(token_ids: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    _, counts = np.unique(np.asarray(token_ids).ravel(), return_counts=True)
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())
