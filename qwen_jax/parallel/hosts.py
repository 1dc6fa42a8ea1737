"""Which part of each global batch this host loads: a block of rows, and a slice of each row's
tokens when the context axis spans hosts.

The data iterators hand host k the k-th of `row_blocks` equal blocks of rows. Hosts whose devices
hold the same rows (the same data-parallel replica, its sequence split over context across hosts)
read the same block and keep only their own tokens, so no host feeds a device rows or tokens it
does not hold.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
from jax.sharding import NamedSharding


class HostBatchLayout(NamedTuple):
    """This host's share of a [B, T] batch: row block `row_block` of `row_blocks`, tokens `length`."""

    row_block: int
    row_blocks: int
    length: slice


def _bounds(index: slice, size: int) -> tuple[int, int]:
    """A device's slice of one axis as (start, end)."""
    start, end, _ = index.indices(size)
    return start, end


def host_batch_layout(sharding: NamedSharding, batch: int, length: int,
                      process_index: int | None = None) -> HostBatchLayout:
    """The layout of a [batch, length] array sharded by `sharding` for `process_index` (this one).

    Raises ValueError when a host's devices do not hold one rectangle of rows x tokens, or the
    hosts' row ranges are not equal blocks: the iterators cannot feed such a mesh.
    """
    process_index = jax.process_index() if process_index is None else process_index
    pieces = collections.defaultdict(set)  # process -> {((row start, end), (token start, end))}
    for device, (rows, tokens) in sharding.devices_indices_map((batch, length)).items():
        pieces[device.process_index].add((_bounds(rows, batch), _bounds(tokens, length)))
    spans = {}
    for process, held in pieces.items():
        rows = min(r[0] for r, _ in held), max(r[1] for r, _ in held)
        tokens = min(t[0] for _, t in held), max(t[1] for _, t in held)
        area = sum((r[1] - r[0]) * (t[1] - t[0]) for r, t in held)
        if area != (rows[1] - rows[0]) * (tokens[1] - tokens[0]):
            raise ValueError(f"process {process}'s devices hold parts of rows {rows} x tokens "
                             f"{tokens}, not all of it: give each host one block of the mesh")
        spans[process] = rows, tokens
    blocks = sorted({rows for rows, _ in spans.values()})
    size = blocks[0][1] - blocks[0][0]
    if blocks != [(start, start + size) for start in range(0, batch, size)]:
        raise ValueError(f"the hosts hold rows {blocks}: not equal contiguous blocks of {batch}")
    rows, tokens = spans[process_index]
    return HostBatchLayout(blocks.index(rows), len(blocks), slice(*tokens))
