"""One decode step of the gated delta rule as a Pallas kernel (Triton on GPU): the state read once and
written once, in place in the layer-stacked decode cache.

At decode the GDN state's bytes are the step's cost (18.9 MB per sequence for the 0.8B shape,
perf-anchors section 5). XLA gives ops.delta_rule.delta_rule_step two reads and one write of it (a
matmul for S^T k and S^T q, then the elementwise update). Here one program per (batch x head, block
of value channels) holds its [dk, block_v] slice of S in registers, reads S^T k and S^T q from it and
writes the new slice over the old one. The kernel takes the whole stacked state [G, B, H, dk, dv] and
the group's index, and its output aliases that buffer: handed a slice, a custom call would need XLA to
copy the slice out and write it back, more bytes than XLA's own fused step. Inference only (no VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.ops.pallas.chunk_recurrence import BLOCK_V, NUM_WARPS


def _step_block(q, k, v, g, beta, state):
    """One value block: q, k [dk, 1], v [1, bv], g, beta scalars, state [dk, bv] f32 -> o [1, bv], new state.

    The rule as delta_rule_step arranges it: delta = beta (v - e^g S^T k), S' = e^g S + k delta^T,
    o = e^g S^T q + (k . q) delta.
    """
    decay = jnp.exp(g)
    delta = beta * (v - decay * jnp.sum(state * k, axis=0, keepdims=True))
    o = decay * jnp.sum(state * q, axis=0, keepdims=True) + jnp.sum(k * q, axis=0, keepdims=True) * delta
    return o, decay * state + k * delta


def _kernel(group_ref, q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, o_ref, new_states_ref, *, block_v):
    row, vb = pl.program_id(0), pl.program_id(1)
    group, cols = group_ref[0], pl.ds(vb * block_v, block_v)
    o, new_state = _step_block(q_ref[row], k_ref[row], v_ref[row, :, cols], g_ref[row], beta_ref[row],
                              states_ref[group, row, :, cols])
    o_ref[row, :, cols] = o
    new_states_ref[group, row, :, cols] = new_state


def pallas_delta_rule_step(q, k, v, g, beta, states, group, *, block_v=None, interpret=False):
    """q, k [B,H,dk], v [B,H,dv], g, beta [B,H] (q, k normalised and scaled), states f32 [G,B,H,dk,dv], group
    int -> o f32 [B,H,dv], states with group `group` stepped (in place); the others unchanged."""
    groups, batch, heads, key_dim, value_dim = states.shape
    block_v = min(BLOCK_V, value_dim) if block_v is None else block_v
    rows = batch * heads
    as_f32 = lambda x, *shape: x.astype(jnp.float32).reshape(rows, *shape)  # noqa: E731
    o, new_states = pl.pallas_call(
        functools.partial(_kernel, block_v=block_v),
        out_shape=(jax.ShapeDtypeStruct((rows, 1, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct((groups, rows, key_dim, value_dim), jnp.float32)),
        grid=(rows, value_dim // block_v), input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret, name="gdr_decode_step")(
        jnp.reshape(group, (1,)).astype(jnp.int32), as_f32(q, key_dim, 1), as_f32(k, key_dim, 1),
        as_f32(v, 1, value_dim), as_f32(g), as_f32(beta), states.reshape(groups, rows, key_dim, value_dim))
    return o.reshape(batch, heads, value_dim), new_states.reshape(states.shape)
