"""The gated delta rule's chunk-to-chunk recurrence as Pallas TPU (Mosaic) kernels, forward and backward.

The same recurrence as chunk_recurrence.py (whose docstring gives the equations), laid out the TPU way:
the grid is (batch x head, value block, chunk) with the chunk axis last and sequential ("arbitrary"),
Pallas pipelines each chunk's blocks from HBM into VMEM, and the state S [dk, block_v] stays in a float32
VMEM scratch across the chunk steps. Each row's per-chunk decays sit in SMEM (scalars). The backward grid
walks the chunks in reverse through its index maps.
Checked in interpret mode on CPU (tests/test_pallas_delta_rule.py) and compiled for TPU topologies.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.ops.pallas.chunk_recurrence import matmul_f32, walk_back_shapes, walk_shapes, with_kernel_vjp

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
                    new_values_ref, state_ref):
    """One chunk of one (row-head, value block): writes o, V' and the chunk's incoming state."""
    n = pl.program_id(2)
    dtype = w_ref.dtype

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[0].astype(jnp.float32)

    state = state_ref[...]
    state_in = state.astype(dtype)
    states_ref[0, 0] = state_in
    new_values_in = (u_ref[0].astype(jnp.float32) - matmul_f32(w_ref[0], state_in)).astype(dtype)
    new_values_ref[0] = new_values_in
    o_ref[0] = (matmul_f32(q_ref[0], state_in) + matmul_f32(qk_ref[0], new_values_in)).astype(o_ref.dtype)
    state = decay_ref[0, 0, n] * state + matmul_f32(kd_ref[0], new_values_in, trans_a=True)
    state_ref[...] = state

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[0] = state


def _backward_kernel(decay_ref, q_ref, qk_ref, w_ref, kd_ref, do_ref, dfinal_ref, du_ref, dleaving_ref,
                     ds0_ref, dstate_ref):
    """One chunk (walked in reverse) of one (row-head, value block): writes dV' and the gradient of the
    state leaving the chunk."""
    n = pl.program_id(2)
    chunk_index = pl.num_programs(2) - 1 - n
    dtype = w_ref.dtype

    @pl.when(n == 0)
    def _():
        dstate_ref[...] = dfinal_ref[0].astype(jnp.float32)

    dstate = dstate_ref[...]
    dstate_in = dstate.astype(dtype)
    dleaving_ref[0, 0] = dstate_in
    d_out = do_ref[0].astype(dtype)
    d_new_values_in = (matmul_f32(qk_ref[0], d_out, trans_a=True) + matmul_f32(kd_ref[0], dstate_in)).astype(dtype)
    du_ref[0] = d_new_values_in
    dstate = (decay_ref[0, 0, chunk_index] * dstate + matmul_f32(q_ref[0], d_out, trans_a=True)
              - matmul_f32(w_ref[0], d_new_values_in, trans_a=True))
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
                 pl.BlockSpec((1, 1, key_dim, block_v), lambda r, v, n: (r, n, 0, v)),
                 _value_cols(chunk, block_v, _in_order))
    return _call(_forward_kernel, (rows, value_dim // block_v, num_chunks), in_specs, out_specs,
                 walk_shapes(u, s0, num_chunks, key_dim), (key_dim, block_v), interpret, "gdr_chunk_forward_tpu")(
        decay[:, None], q, qk, w, u, kd, s0)


def _backward(q, qk, w, kd, decay, d_out, d_final, *, chunk, block_v, interpret):
    rows, length, value_dim = d_out.shape
    key_dim, num_chunks = w.shape[-1], length // chunk
    state_block = pl.BlockSpec((1, key_dim, block_v), lambda r, v, n: (r, 0, v))
    reverse = lambda n: num_chunks - 1 - n  # noqa: E731 - grid step -> chunk, last chunk first
    chunk_state = pl.BlockSpec((1, 1, key_dim, block_v), lambda r, v, n: (r, reverse(n), 0, v))
    in_specs = [_decays(num_chunks), _rows(chunk, key_dim, reverse), _rows(chunk, chunk, reverse),
                _rows(chunk, key_dim, reverse), _rows(chunk, key_dim, reverse),
                _value_cols(chunk, block_v, reverse), state_block]
    out_specs = (_value_cols(chunk, block_v, reverse), chunk_state, state_block)
    return _call(_backward_kernel, (rows, value_dim // block_v, num_chunks), in_specs, out_specs,
                 walk_back_shapes(d_out, d_final, num_chunks, key_dim), (key_dim, block_v), interpret,
                 "gdr_chunk_backward_tpu")(decay[:, None], q, qk, w, kd, d_out, d_final)


# chunk_recurrence's interface and results (rows R = batch x heads, T = N x C), on TPU.
chunk_recurrence_tpu = with_kernel_vjp(_forward, _backward)
