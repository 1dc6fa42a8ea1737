"""The gated delta rule's chunk-to-chunk recurrence as Pallas TPU (Mosaic) kernels, forward and backward.

The same recurrence as chunk_recurrence.py (whose docstring gives the equations), laid out the TPU way:
the grid is (batch x head, value block, chunk) with the chunk axis last and sequential ("arbitrary"),
Pallas pipelines each chunk's blocks from HBM into VMEM, and the state S [dk, block_v] stays in a float32
VMEM scratch across the chunk steps. Each row's per-chunk decays sit in SMEM (scalars). The backward grid
walks the chunks in reverse through its index maps and also returns the gradient of every chunk's
incoming state, from which XLA forms the decay gradients (one reduction instead of per-block partials).
Checked in interpret mode on CPU (tests/test_pallas_delta_rule.py) and compiled for TPU topologies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.ops.pallas.chunk_recurrence import (gradient_shapes, matmul_f32, sum_parts,
                                                   with_kernel_vjp)

BLOCK_V = 128  # the TPU's lane width
SEMANTICS = ("parallel", "parallel", "arbitrary")  # rows and value blocks independent; chunks in order


def _rows(chunk, width, order):
    """BlockSpec of one chunk's [chunk, width] slab of an [R, T, width] array (full width);
    order(grid step) -> chunk index."""
    return pl.BlockSpec((1, chunk, width), lambda r, v, n: (r, order(n), 0))


def _value_cols(chunk, block_v, order):
    """BlockSpec of one chunk's [chunk, block_v] slab of an [R, T, dv] array."""
    return pl.BlockSpec((1, chunk, block_v), lambda r, v, n: (r, order(n), v))


def _decays(num_chunks):
    """BlockSpec of one row's chunk decays in SMEM (read as scalars) from decays [R, 1, N]: the middle
    axis makes the block's last two dims the array's, as Mosaic's tiling asks."""
    return pl.BlockSpec((1, 1, num_chunks), lambda r, v, n: (r, 0, 0), memory_space=pltpu.SMEM)


def _in_order(n):
    return n


def _forward_kernel(decay_ref, q_ref, qk_ref, w_ref, u_ref, kd_ref, s0_ref, o_ref, final_ref, states_ref,
                    state_ref):
    """One chunk of one (row-head, value block): writes o and the chunk's incoming state."""
    n = pl.program_id(2)
    dtype = w_ref.dtype

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[0].astype(jnp.float32)

    state = state_ref[...]
    states_ref[0, 0] = state.astype(states_ref.dtype)
    state_in = state.astype(dtype)
    new_values = u_ref[0].astype(jnp.float32) - matmul_f32(w_ref[0], state_in)
    new_values_in = new_values.astype(dtype)
    o_ref[0] = (matmul_f32(q_ref[0], state_in) + matmul_f32(qk_ref[0], new_values_in)).astype(o_ref.dtype)
    state = decay_ref[0, 0, n] * state + matmul_f32(kd_ref[0], new_values_in, trans_a=True)
    state_ref[...] = state

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[0] = state


def _backward_kernel(decay_ref, q_ref, qk_ref, w_ref, u_ref, kd_ref, states_ref, do_ref, dfinal_ref,
                     dq_ref, dqk_ref, dw_ref, du_ref, dkd_ref, dstates_ref, ds0_ref, dstate_ref):
    """One chunk (walked in reverse) of one (row-head, value block); shared gradients are this block's
    partial sums, dstates the gradient of the state leaving each chunk."""
    n = pl.program_id(2)
    chunk_index = pl.num_programs(2) - 1 - n
    dtype = w_ref.dtype

    @pl.when(n == 0)
    def _():
        dstate_ref[...] = dfinal_ref[0].astype(jnp.float32)

    dstate = dstate_ref[...]
    dstates_ref[0, 0] = dstate
    state_in = states_ref[0, 0].astype(dtype)
    w, kd, q = w_ref[0], kd_ref[0], q_ref[0]
    new_values_in = (u_ref[0].astype(jnp.float32) - matmul_f32(w, state_in)).astype(dtype)
    d_out = do_ref[0].astype(dtype)
    dstate_in = dstate.astype(dtype)
    d_new_values = matmul_f32(qk_ref[0], d_out, trans_a=True) + matmul_f32(kd, dstate_in)
    d_new_values_in = d_new_values.astype(dtype)
    du_ref[0] = d_new_values.astype(du_ref.dtype)
    dw_ref[0, 0] = -matmul_f32(d_new_values_in, state_in, trans_b=True)
    dq_ref[0, 0] = matmul_f32(d_out, state_in, trans_b=True)
    dqk_ref[0, 0] = matmul_f32(d_out, new_values_in, trans_b=True)
    dkd_ref[0, 0] = matmul_f32(new_values_in, dstate_in, trans_b=True)
    dstate = (decay_ref[0, 0, chunk_index] * dstate + matmul_f32(q, d_out, trans_a=True)
              - matmul_f32(w, d_new_values_in, trans_a=True))
    dstate_ref[...] = dstate

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[0] = dstate


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(scratch, jnp.float32)], interpret=interpret, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS))


def _forward(q, qk, w, u, kd, decay, s0, *, chunk, block_v, interpret):
    rows, length, value_dim = u.shape
    key_dim, num_chunks = w.shape[-1], length // chunk
    state_block = pl.BlockSpec((1, key_dim, block_v), lambda r, v, n: (r, 0, v))
    in_specs = [_decays(num_chunks), _rows(chunk, key_dim, _in_order),
                _rows(chunk, chunk, _in_order), _rows(chunk, key_dim, _in_order),
                _value_cols(chunk, block_v, _in_order), _rows(chunk, key_dim, _in_order), state_block]
    out_specs = (_value_cols(chunk, block_v, _in_order), state_block,
                 pl.BlockSpec((1, 1, key_dim, block_v), lambda r, v, n: (r, n, 0, v)))
    out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32),
                 jax.ShapeDtypeStruct((rows, num_chunks, key_dim, value_dim), w.dtype))
    return _call(_forward_kernel, (rows, value_dim // block_v, num_chunks), in_specs, out_specs,
                 out_shape, (key_dim, block_v), interpret, "gdr_chunk_forward_tpu")(
        decay[:, None], q, qk, w, u, kd, s0)


def _backward(q, qk, w, u, kd, decay, states, d_out, d_final, *, chunk, block_v, interpret):
    rows, length, value_dim = u.shape
    key_dim, num_chunks, blocks = w.shape[-1], length // chunk, value_dim // block_v
    state_block = pl.BlockSpec((1, key_dim, block_v), lambda r, v, n: (r, 0, v))
    reverse = lambda n: num_chunks - 1 - n  # noqa: E731 - grid step -> chunk, last chunk first
    chunk_state = pl.BlockSpec((1, 1, key_dim, block_v), lambda r, v, n: (r, reverse(n), 0, v))

    def part(width):  # this value block's partial sum of a shared gradient, [blocks, R, T, width]
        return pl.BlockSpec((1, 1, chunk, width), lambda r, v, n: (v, r, reverse(n), 0))

    in_specs = [_decays(num_chunks), _rows(chunk, key_dim, reverse),
                _rows(chunk, chunk, reverse), _rows(chunk, key_dim, reverse),
                _value_cols(chunk, block_v, reverse), _rows(chunk, key_dim, reverse), chunk_state,
                _value_cols(chunk, block_v, reverse), state_block]
    out_specs = (part(key_dim), part(chunk), part(key_dim), _value_cols(chunk, block_v, reverse),
                 part(key_dim), chunk_state, state_block)
    out_shape = gradient_shapes(u.shape, key_dim, chunk, blocks,
                                (rows, num_chunks, key_dim, value_dim))  # dstates
    return _call(_backward_kernel, (rows, blocks, num_chunks), in_specs, out_specs, out_shape,
                 (key_dim, block_v), interpret, "gdr_chunk_backward_tpu")(
        decay[:, None], q, qk, w, u, kd, states, d_out, d_final)


def _gradients(q, qk, w, u, kd, decay, states, d_out, d_final, *, chunk, block_v, interpret):
    dq, dqk, dw, du, dkd, dstates, ds0 = _backward(q, qk, w, u, kd, decay, states, d_out, d_final,
                                                   chunk=chunk, block_v=block_v, interpret=interpret)
    # d decay[r, n] = <incoming state of chunk n, gradient of the state leaving it>.
    ddecay = jnp.einsum("rnkv,rnkv->rn", states.astype(jnp.float32), dstates)
    return (sum_parts(dq, q), sum_parts(dqk, qk), sum_parts(dw, w), du.astype(u.dtype), sum_parts(dkd, kd),
            ddecay.astype(decay.dtype), ds0)


# chunk_recurrence's interface and results (rows R = batch x heads, T = N x C), on TPU.
chunk_recurrence_tpu = with_kernel_vjp(_forward, _gradients)
