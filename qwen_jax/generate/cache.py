"""Decode caches for the hybrid stack, preallocated to a fixed length (spec section 2.5).

Full-attention layers keep keys (after k_norm and RoPE) and values; Gated DeltaNet layers keep the
last K-1 pre-conv inputs and the fp32 recurrent state. The per-layer entries mirror the model's
own layout (scanned groups stacked [G, ...], then the unscanned tail), so they ride the same scan.
Column c of every row is written by the same call; `valid` marks the columns that hold real
tokens. Within one call a row's real tokens come first and its padding after (right padding), so
prompts of different lengths, rows that already stopped and replies of different lengths all
share one column index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from qwen_jax.config import LINEAR_ATTENTION, ModelConfig
from qwen_jax.parallel.rules import spec_for

# Logical axes of each per-layer entry (batch first), sharded by the same rules as the model:
# rows like the batch, attention and GDN heads like the heads of the projections that fill them.
ENTRY_AXES = {"k": ("batch", None, "heads", None), "v": ("batch", None, "heads", None),
              "conv": ("batch", None, "heads"), "state": ("batch", "heads", None, None)}


@struct.dataclass
class Cache:
    """groups: per pattern slot, arrays stacked [G, ...]; tail: per tail layer; valid [B, S] bool;
    positions [B] int32 (RoPE position of each row's next token); index: next column to write."""

    groups: tuple
    tail: tuple
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


def _layer_cache(cfg: ModelConfig, layer_type: str, batch: int, max_length: int) -> dict:
    if layer_type == LINEAR_ATTENTION:
        return {"conv": jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, cfg.conv_dim), jnp.dtype(cfg.dtype)),
                "state": jnp.zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                    cfg.linear_value_head_dim), jnp.float32)}
    shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(cfg.dtype))}


def init_cache(cfg: ModelConfig, pattern: tuple[str, ...], num_groups: int, tail: tuple[str, ...],
               batch: int, max_length: int) -> Cache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generated)."""
    stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_groups, *x.shape)), tree)
    return Cache(
        groups=tuple(stack(_layer_cache(cfg, t, batch, max_length)) for t in pattern),
        tail=tuple(_layer_cache(cfg, t, batch, max_length) for t in tail),
        valid=jnp.zeros((batch, max_length), bool),
        positions=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32))


# Entries a scanned layer updates in place in their stacked [G, ...] arrays (see scanned_view).
IN_PLACE = ("k", "v", "state")


def scanned_view(stacked: dict, group: jax.Array) -> dict:
    """A scanned layer's part of its stacked [G, ...] cache entries, for group `group`.

    Attention keys and values and the GDN state stay stacked, with the group's index: the layer writes
    only its new key and value columns, and the Pallas decode step steps the state where it lies
    (slicing [B, S, ...] out and back in would move the whole cache every step). The GDN conv window
    (a few rows) is sliced out.
    """
    return {name: x if name in IN_PLACE else x[group] for name, x in stacked.items()} | {"group": group}


def write_back(stacked: dict, view: dict, group: jax.Array) -> dict:
    """The stacked entries after the layer of group `group` returned its updated `scanned_view`."""
    return {name: view[name] if name in IN_PLACE else jax.lax.dynamic_update_index_in_dim(x, view[name], group, 0)
            for name, x in stacked.items()}


def write_columns(entry: jax.Array, new: jax.Array, column: jax.Array, group: jax.Array | None = None) -> jax.Array:
    """new [B, T, ...] written at columns column .. column + T - 1 of entry [B, S, ...], or of group `group`
    of a stacked entry [G, B, S, ...]."""
    new = new.astype(entry.dtype)
    if group is None:
        return jax.lax.dynamic_update_slice(entry, new, (0, column) + (0,) * (new.ndim - 2))
    return jax.lax.dynamic_update_slice(entry, new[None], (group, 0, column) + (0,) * (new.ndim - 2))


def cache_shardings(cache: Cache, mesh: Mesh, rules):
    """The NamedSharding of every cache array (concrete or abstract) on `mesh` by the logical-axis
    `rules` (stacked groups: layers first)."""
    def placement(path, x):
        name = getattr(path[-1], "key", None)
        if name in ENTRY_AXES:
            logical = ENTRY_AXES[name]
            logical = (None,) * (x.ndim - len(logical)) + logical  # the stacked-group axis
        else:  # valid [B, S], positions [B], index []
            logical = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return NamedSharding(mesh, spec_for(logical, x.shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(placement, cache)
