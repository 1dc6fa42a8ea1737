"""Which part of each global batch this host loads: its share of the rows, and of each row's tokens
when the context axis spans hosts.

The data iterators hand host k the k-th of `row_blocks` equal shares of rows. Hosts whose devices
hold the same rows (the same data-parallel replica, its sequence split over context across hosts)
read the same share and keep only their own tokens, so no host feeds a device rows or tokens it
does not hold. Neither need be contiguous: a topology-aware mesh on a multi-host TPU slice
interleaves the hosts along its axes, and jax.make_array_from_process_local_data lays a host's
local rows and tokens onto the global ones it holds, in order.

`gather_objects` hands every host what each one holds (episodes in RL, data iterator states to save).
"""

from __future__ import annotations

import collections
import pickle
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


class HostBatchLayout(NamedTuple):
    """This host's share of a [B, T] batch: row share `row_block` of `row_blocks`, and the token spans
    its devices hold, in order."""

    row_block: int
    row_blocks: int
    tokens: tuple[slice, ...]

    def own_tokens(self, value: np.ndarray, axis: int) -> np.ndarray:
        """value [..., T, ...] -> only this host's tokens along `axis`, its spans concatenated in order."""
        pieces = [value[(slice(None),) * axis + (span,)] for span in self.tokens]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)


def _bounds(index: slice, size: int) -> tuple[int, int]:
    """A device's slice of one axis as (start, end)."""
    start, end, _ = index.indices(size)
    return start, end


def _merged(spans) -> tuple[tuple[int, int], ...]:
    """(start, end) spans -> sorted, with touching or overlapping ones joined."""
    merged = []
    for start, end in sorted(set(spans)):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


def _size(spans: tuple[tuple[int, int], ...]) -> int:
    return sum(end - start for start, end in spans)


def host_batch_layout(sharding: NamedSharding, batch: int, length: int,
                      process_index: int | None = None) -> HostBatchLayout:
    """The layout of a [batch, length] array sharded by `sharding` for `process_index` (this one).

    Raises ValueError when a host's devices do not hold every one of its tokens for each of its rows,
    or the hosts' row sets are not equal-sized and either the same or disjoint: the iterators cannot
    feed such a mesh.
    """
    process_index = jax.process_index() if process_index is None else process_index
    pieces = collections.defaultdict(set)  # process -> {((row start, end), (token start, end))}
    for device, (rows, tokens) in sharding.devices_indices_map((batch, length)).items():
        pieces[device.process_index].add((_bounds(rows, batch), _bounds(tokens, length)))
    row_sets, token_sets = {}, {}
    for process, held in pieces.items():
        rows, tokens = _merged(r for r, _ in held), _merged(t for _, t in held)
        area = sum((r[1] - r[0]) * (t[1] - t[0]) for r, t in held)
        if area != _size(rows) * _size(tokens):
            raise ValueError(f"process {process}'s devices hold parts of rows {list(rows)} x tokens "
                             f"{list(tokens)}, not all of it: give each host one block of the mesh")
        row_sets[process], token_sets[process] = rows, tokens
    shares = sorted(set(row_sets.values()))
    # The shares cover every row, so equal sizes adding up to the batch leave no overlap.
    if len({_size(share) for share in shares}) > 1 or sum(map(_size, shares)) != batch:
        raise ValueError(f"the hosts hold rows {[list(share) for share in shares]}: not equal shares that "
                         f"split the {batch} rows")
    return HostBatchLayout(shares.index(row_sets[process_index]), len(shares),
                           tuple(slice(*span) for span in token_sets[process_index]))


def gather_objects(local: list) -> list:
    """Every host's list, concatenated in process order, on every host (pickled, padded bytes)."""
    if jax.process_count() == 1:
        return list(local)
    payload = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    everyone = multihost_utils.process_allgather(padded)  # [process_count, longest]
    return [item for size, row in zip(sizes.reshape(-1), everyone)
            for item in pickle.loads(row[:int(size)].tobytes())]
