"""Context parallelism for the Gated DeltaNet: a sequence split into contiguous shards over `context`.

Every device computes its shard's chunk terms once, and from them the affine map its shard applies
to an incoming state, S -> M S + B. The maps are small (dk x (dk + dv) per row and head); they are
gathered over `context` and composed by an associative scan, so every device learns the true state
entering its shard, runs its chunks from it, and holds the whole sequence's final state too. A shard
whose first token starts a new document (its segment id differs from the previous shard's last)
takes a zero state, and the depthwise conv's window reaches back into the previous shard.
The functions named *_across_shards run inside shard_map over AXIS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qwen_jax.ops.delta_rule import (PRECISION, chunk_terms, compose_affine, rule_from_terms, start_state,
                                     terms_map)

AXIS = "context"


def context_shards(mesh) -> int:
    """How many shards the sequence is split into on `mesh` (1 without a mesh or a context axis)."""
    return 1 if mesh is None else mesh.shape.get(AXIS, 1)


def previous_shard_tail(x: jax.Array, rows: int, fill) -> jax.Array:
    """x [B, t, ...] -> the previous shard's last `rows` positions [B, rows, ...]; `fill` on the first shard."""
    shards = lax.axis_size(AXIS)
    shifted = lax.ppermute(x[:, -rows:], AXIS, [(i, i + 1) for i in range(shards - 1)])
    return jnp.where(lax.axis_index(AXIS) == 0, fill, shifted)


def delta_rule_across_shards(q, k, v, g, beta, segment_ids, *, chunk_size, initial_state=None,
                             terms_of=chunk_terms, from_terms=rule_from_terms):
    """This shard's q, k [B,t,H,dk], v [B,t,H,dv], g, beta [B,t,H], ids [B,t] -> (o [B,t,H,dv] in v's dtype,
    the whole sequence's final state [B,H,dk,dv]). terms_of(q, k, v, g, beta, ids, chunk_size) -> ChunkTerms
    forms the chunks' terms; from_terms(terms, state0) -> (o, final) runs the chunks."""
    terms = terms_of(q, k, v, g, beta, segment_ids, chunk_size)
    transition, offset = terms_map(terms)
    first_id = segment_ids[:, :1]
    # The first shard always carries the initial state, as the unsplit rule does.
    carries = (previous_shard_tail(segment_ids, 1, fill=first_id) == first_id)[:, 0, None, None, None]
    transition = jnp.where(carries, transition, 0.0)

    maps = lax.all_gather((transition, offset), AXIS)  # [P, B, H, ...]: every shard's map
    after_m, after_b = lax.associative_scan(compose_affine, maps)  # the maps up to and including each shard
    state0 = start_state(initial_state, q, v)

    def state_after(shard):
        return jnp.einsum("bhkj,bhjv->bhkv", after_m[shard], state0, precision=PRECISION) + after_b[shard]

    index = lax.axis_index(AXIS)
    incoming = jnp.where(index > 0, state_after(jnp.maximum(index - 1, 0)), state0)
    o, _ = from_terms(terms, jnp.where(carries, incoming, 0.0))
    return o[:, :q.shape[1]].astype(v.dtype), state_after(-1)
