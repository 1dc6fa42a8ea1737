"""The gated delta rule's chunk-to-chunk recurrence as Pallas kernels (Triton on GPU), forward and backward.

Given the chunk-local terms (ops.delta_rule.ChunkTerms, computed chunk-parallel by XLA), one program per
(batch x head, block of value channels) walks the chunks in order, holding its slice of the state
S [dk, block_v] in float32 registers:
    V' = u - w S;   o = q_decayed S + qk_decayed V';   S <- state_decay S + k_to_end^T V'.
Matmul operands are in the terms' dtype (bf16 on the fast path), accumulation is float32. The backward
kernel walks the chunks in reverse from the incoming states the forward stored, and the value-channel
blocks' partial sums of the shared gradients (dq, dw, dk, dqk, ddecay) are added up afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_V = 64
NUM_WARPS = 4


def matmul_f32(a, b, *, trans_a=False, trans_b=False):
    """a @ b with optional transposes, float32 accumulation; float32 operands stay float32 (no TF32)."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _forward_kernel(q_ref, qk_ref, w_ref, u_ref, kd_ref, decay_ref, s0_ref,
                    o_ref, final_ref, states_ref, *, num_chunks, chunk, block_v):
    """One (row-head, value block): o [T, bv] and the incoming state of every chunk, in chunk order."""
    row, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)
    dtype = w_ref.dtype

    def step(n, state):
        rows = pl.ds(n * chunk, chunk)
        states_ref[row, n, :, cols] = state.astype(states_ref.dtype)
        state_in = state.astype(dtype)
        new_values = u_ref[row, rows, cols].astype(jnp.float32) - matmul_f32(w_ref[row, rows, :], state_in)
        new_values_in = new_values.astype(dtype)
        out = matmul_f32(q_ref[row, rows, :], state_in) + matmul_f32(qk_ref[row, rows, :], new_values_in)
        o_ref[row, rows, cols] = out.astype(o_ref.dtype)
        return decay_ref[row, n] * state + matmul_f32(kd_ref[row, rows, :], new_values_in, trans_a=True)

    final = lax.fori_loop(0, num_chunks, step, s0_ref[row, :, cols].astype(jnp.float32))
    final_ref[row, :, cols] = final


def _backward_kernel(q_ref, qk_ref, w_ref, u_ref, kd_ref, decay_ref, states_ref, do_ref, dfinal_ref,
                     dq_ref, dqk_ref, dw_ref, du_ref, dkd_ref, ddecay_ref, ds0_ref, *, num_chunks, chunk,
                     block_v):
    """Reverse walk for one (row-head, value block); shared gradients are this block's partial sums."""
    row, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)
    dtype = w_ref.dtype

    def step(i, dstate):  # dstate: gradient of the state leaving chunk n
        n = num_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        state = states_ref[row, n, :, cols]
        w, kd, q = w_ref[row, rows, :], kd_ref[row, rows, :], q_ref[row, rows, :]
        new_values = u_ref[row, rows, cols].astype(jnp.float32) - matmul_f32(w, state.astype(dtype))
        new_values_in = new_values.astype(dtype)
        d_out = do_ref[row, rows, cols].astype(dtype)
        dstate_in = dstate.astype(dtype)
        d_new_values = matmul_f32(qk_ref[row, rows, :], d_out, trans_a=True) + matmul_f32(kd, dstate_in)
        d_new_values_in = d_new_values.astype(dtype)
        du_ref[row, rows, cols] = d_new_values.astype(du_ref.dtype)
        dw_ref[vb, row, rows, :] = (-matmul_f32(d_new_values_in, state.astype(dtype), trans_b=True)).astype(dw_ref.dtype)
        dq_ref[vb, row, rows, :] = matmul_f32(d_out, state.astype(dtype), trans_b=True).astype(dq_ref.dtype)
        dqk_ref[vb, row, rows, :] = matmul_f32(d_out, new_values_in, trans_b=True).astype(dqk_ref.dtype)
        dkd_ref[vb, row, rows, :] = matmul_f32(new_values_in, dstate_in, trans_b=True).astype(dkd_ref.dtype)
        ddecay_ref[vb, row, n] = jnp.sum(state.astype(jnp.float32) * dstate)
        return (decay_ref[row, n] * dstate + matmul_f32(q, d_out, trans_a=True)
                - matmul_f32(w, d_new_values_in, trans_a=True))

    ds0 = lax.fori_loop(0, num_chunks, step, dfinal_ref[row, :, cols].astype(jnp.float32))
    ds0_ref[row, :, cols] = ds0


def _grid_and_params(rows, value_dim, block_v):
    """The launch grid (row-heads, value blocks) and Triton's launch parameters."""
    return (rows, value_dim // block_v), plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(q, qk, w, u, kd, decay, s0, *, chunk, block_v, interpret):
    rows, length, value_dim = u.shape
    num_chunks = length // chunk
    grid, params = _grid_and_params(rows, value_dim, block_v)
    kernel = functools.partial(_forward_kernel, num_chunks=num_chunks, chunk=chunk, block_v=block_v)
    key_dim = w.shape[-1]
    out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct(s0.shape, jnp.float32),
                 jax.ShapeDtypeStruct((rows, num_chunks, key_dim, value_dim), w.dtype))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, compiler_params=params,
                          interpret=interpret, name="gdr_chunk_forward")(q, qk, w, u, kd, decay, s0)


def gradient_shapes(u_shape, key_dim: int, chunk: int, blocks: int, decay_part_shape) -> tuple:
    """A backward kernel's outputs (float32): per-value-block parts of dq, dqk and dw, du, parts of dkd,
    what the decay gradient is formed from (decay_part_shape), ds0."""
    rows, length, value_dim = u_shape
    part = lambda width: jax.ShapeDtypeStruct((blocks, rows, length, width), jnp.float32)  # noqa: E731
    return (part(key_dim), part(chunk), part(key_dim), jax.ShapeDtypeStruct(u_shape, jnp.float32),
            part(key_dim), jax.ShapeDtypeStruct(decay_part_shape, jnp.float32),
            jax.ShapeDtypeStruct((rows, key_dim, value_dim), jnp.float32))


def _backward(q, qk, w, u, kd, decay, states, d_out, d_final, *, chunk, block_v, interpret):
    rows, length, value_dim = u.shape
    num_chunks, key_dim = length // chunk, w.shape[-1]
    blocks = value_dim // block_v
    grid, params = _grid_and_params(rows, value_dim, block_v)
    kernel = functools.partial(_backward_kernel, num_chunks=num_chunks, chunk=chunk, block_v=block_v)
    out_shape = gradient_shapes(u.shape, key_dim, chunk, blocks, (blocks, rows, num_chunks))  # ddecay parts
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, compiler_params=params,
                          interpret=interpret, name="gdr_chunk_backward")(
        q, qk, w, u, kd, decay, states, d_out, d_final)


def with_kernel_vjp(forward, gradients):
    """The differentiable recurrence over a kernel pair: forward(q, qk, w, u, kd, decay, s0, *, chunk,
    block_v, interpret) -> (o, final, incoming states); gradients(q, qk, w, u, kd, decay, states, d_out,
    d_final, *, chunk, block_v, interpret) -> the grads of (q, qk, w, u, kd, decay, s0)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
    def recurrence(q, qk, w, u, kd, decay, s0, chunk, block_v, interpret):
        o, final, _ = forward(q, qk, w, u, kd, decay, s0, chunk=chunk, block_v=block_v, interpret=interpret)
        return o, final

    def recurrence_fwd(q, qk, w, u, kd, decay, s0, chunk, block_v, interpret):
        o, final, states = forward(q, qk, w, u, kd, decay, s0, chunk=chunk, block_v=block_v,
                                   interpret=interpret)
        return (o, final), (q, qk, w, u, kd, decay, states)

    def recurrence_bwd(chunk, block_v, interpret, residuals, grads):
        return gradients(*residuals, *grads, chunk=chunk, block_v=block_v, interpret=interpret)

    recurrence.defvjp(recurrence_fwd, recurrence_bwd)
    return recurrence


def sum_parts(parts, like):
    """Per-value-block partial sums [blocks, ...] -> their total in `like`'s dtype."""
    return jnp.sum(parts, axis=0).astype(like.dtype)


def _gradients(q, qk, w, u, kd, decay, states, d_out, d_final, *, chunk, block_v, interpret):
    dq, dqk, dw, du, dkd, ddecay, ds0 = _backward(q, qk, w, u, kd, decay, states, d_out, d_final,
                                                  chunk=chunk, block_v=block_v, interpret=interpret)
    return (sum_parts(dq, q), sum_parts(dqk, qk), sum_parts(dw, w), du.astype(u.dtype), sum_parts(dkd, kd),
            sum_parts(ddecay, decay), ds0)


chunk_recurrence = with_kernel_vjp(_forward, _gradients)
chunk_recurrence.__doc__ = """Rows R = batch x heads: q, w, kd [R,T,dk], qk [R,T,C], u [R,T,dv], decay [R,N] f32,
s0 [R,dk,dv] f32 -> o [R,T,dv] (u's dtype), final state [R,dk,dv] f32. T = N x C."""
