"""The gated delta rule's chunk-to-chunk recurrence as Pallas kernels (Triton on GPU), forward and backward.

Given the chunk-local terms (ops.delta_rule.ChunkTerms, computed chunk-parallel by XLA), one program per
(batch x head, block of value channels) walks the chunks in order, holding its slice of the state
S [dk, block_v] in float32 registers:
    V' = u - w S;   o = q_decayed S + qk_decayed V';   S <- state_decay S + k_to_end^T V'.
Matmul operands are in the terms' dtype (bf16 on the fast path), accumulation is float32. The forward
also stores every chunk's incoming state and V'. The backward kernel walks the chunks in reverse carrying
only the state's gradient dS and stores dV' and every chunk's leaving dS; the gradients of q_decayed,
qk_decayed, w, k_to_end and the decays are then chunk-parallel products (ops.delta_rule.terms_gradients),
which XLA runs over whole value heads: no per-block partial sums, and four matmuls per step, not nine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.ops.delta_rule import terms_gradients

BLOCK_V = 64
NUM_WARPS = 4


def matmul_f32(a, b, *, trans_a=False, trans_b=False):
    """a @ b with optional transposes, float32 accumulation; float32 operands stay float32 (no TF32)."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _forward_kernel(q_ref, qk_ref, w_ref, u_ref, kd_ref, decay_ref, s0_ref,
                    o_ref, final_ref, states_ref, new_values_ref, *, num_chunks, chunk, block_v):
    """One (row-head, value block): o [T, bv], V' [T, bv] and the incoming state of every chunk."""
    row, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)
    dtype = w_ref.dtype

    def step(n, state):
        rows = pl.ds(n * chunk, chunk)
        state_in = state.astype(dtype)
        states_ref[row, n, :, cols] = state_in
        new_values = u_ref[row, rows, cols].astype(jnp.float32) - matmul_f32(w_ref[row, rows, :], state_in)
        new_values_in = new_values.astype(dtype)
        new_values_ref[row, rows, cols] = new_values_in
        out = matmul_f32(q_ref[row, rows, :], state_in) + matmul_f32(qk_ref[row, rows, :], new_values_in)
        o_ref[row, rows, cols] = out.astype(o_ref.dtype)
        return decay_ref[row, n] * state + matmul_f32(kd_ref[row, rows, :], new_values_in, trans_a=True)

    final = lax.fori_loop(0, num_chunks, step, s0_ref[row, :, cols].astype(jnp.float32))
    final_ref[row, :, cols] = final


def _backward_kernel(q_ref, qk_ref, w_ref, kd_ref, decay_ref, do_ref, dfinal_ref,
                     du_ref, dleaving_ref, ds0_ref, *, num_chunks, chunk, block_v):
    """Reverse walk for one (row-head, value block): dV' [T, bv] and the gradient of every chunk's leaving
    state, from dS (leaving chunk n) -> dV' = qk^T dO + k_to_end dS -> dS (entering it)."""
    row, vb = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(vb * block_v, block_v)
    dtype = w_ref.dtype

    def step(i, dstate):
        n = num_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        dstate_in = dstate.astype(dtype)
        dleaving_ref[row, n, :, cols] = dstate_in
        d_out = do_ref[row, rows, cols].astype(dtype)
        d_new_values = (matmul_f32(qk_ref[row, rows, :], d_out, trans_a=True)
                        + matmul_f32(kd_ref[row, rows, :], dstate_in))
        d_new_values_in = d_new_values.astype(dtype)
        du_ref[row, rows, cols] = d_new_values_in
        return (decay_ref[row, n] * dstate + matmul_f32(q_ref[row, rows, :], d_out, trans_a=True)
                - matmul_f32(w_ref[row, rows, :], d_new_values_in, trans_a=True))

    ds0 = lax.fori_loop(0, num_chunks, step, dfinal_ref[row, :, cols].astype(jnp.float32))
    ds0_ref[row, :, cols] = ds0


def _grid_and_params(rows, value_dim, block_v):
    """The launch grid (row-heads, value blocks) and Triton's launch parameters."""
    return (rows, value_dim // block_v), plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def walk_shapes(u, s0, num_chunks: int, key_dim: int) -> tuple:
    """A forward kernel's outputs: o and V' [R, T, dv] and the incoming states [R, N, dk, dv] (u's dtype),
    the final state (float32)."""
    rows, _, value_dim = u.shape
    return (jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32),
            jax.ShapeDtypeStruct((rows, num_chunks, key_dim, value_dim), u.dtype),
            jax.ShapeDtypeStruct(u.shape, u.dtype))


def walk_back_shapes(d_out, d_final, num_chunks: int, key_dim: int) -> tuple:
    """A backward kernel's outputs: dV' [R, T, dv] and the leaving states' gradients [R, N, dk, dv] (d_out's
    dtype), ds0 (float32)."""
    rows, _, value_dim = d_out.shape
    return (jax.ShapeDtypeStruct(d_out.shape, d_out.dtype),
            jax.ShapeDtypeStruct((rows, num_chunks, key_dim, value_dim), d_out.dtype),
            jax.ShapeDtypeStruct(d_final.shape, jnp.float32))


def _forward(q, qk, w, u, kd, decay, s0, *, chunk, block_v, interpret):
    rows, length, value_dim = u.shape
    num_chunks = length // chunk
    grid, params = _grid_and_params(rows, value_dim, block_v)
    kernel = functools.partial(_forward_kernel, num_chunks=num_chunks, chunk=chunk, block_v=block_v)
    return pl.pallas_call(kernel, out_shape=walk_shapes(u, s0, num_chunks, w.shape[-1]), grid=grid,
                          compiler_params=params, interpret=interpret, name="gdr_chunk_forward")(
        q, qk, w, u, kd, decay, s0)


def _backward(q, qk, w, kd, decay, d_out, d_final, *, chunk, block_v, interpret):
    rows, length, value_dim = d_out.shape
    num_chunks = length // chunk
    grid, params = _grid_and_params(rows, value_dim, block_v)
    kernel = functools.partial(_backward_kernel, num_chunks=num_chunks, chunk=chunk, block_v=block_v)
    return pl.pallas_call(kernel, out_shape=walk_back_shapes(d_out, d_final, num_chunks, w.shape[-1]),
                          grid=grid, compiler_params=params, interpret=interpret, name="gdr_chunk_backward")(
        q, qk, w, kd, decay, d_out, d_final)


def with_kernel_vjp(forward, backward):
    """The differentiable recurrence over a kernel pair: forward(q, qk, w, u, kd, decay, s0, *, chunk,
    block_v, interpret) -> (o, final, incoming states, V'); backward(q, qk, w, kd, decay, d_out, d_final,
    *, chunk, block_v, interpret) -> (dV', leaving states' gradients, ds0). The other gradients are
    chunk-parallel products, taken here."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
    def recurrence(q, qk, w, u, kd, decay, s0, chunk, block_v, interpret):
        return forward(q, qk, w, u, kd, decay, s0, chunk=chunk, block_v=block_v, interpret=interpret)[:2]

    def recurrence_fwd(q, qk, w, u, kd, decay, s0, chunk, block_v, interpret):
        o, final, states, new_values = forward(q, qk, w, u, kd, decay, s0, chunk=chunk, block_v=block_v,
                                               interpret=interpret)
        return (o, final), (q, qk, w, kd, decay, states, new_values)

    def recurrence_bwd(chunk, block_v, interpret, residuals, grads):
        q, qk, w, kd, decay, states, new_values = residuals
        d_out = grads[0].astype(w.dtype)
        d_new_values, d_leaving, ds0 = backward(q, qk, w, kd, decay, d_out, grads[1], chunk=chunk,
                                                block_v=block_v, interpret=interpret)
        rows, length, _ = d_out.shape
        by_chunk = lambda x: x.reshape(rows, length // chunk, chunk, x.shape[-1])  # noqa: E731
        d = terms_gradients(by_chunk(d_out), states, by_chunk(new_values), by_chunk(d_new_values), d_leaving,
                            operand=w.dtype)
        flat = lambda d_x, x: d_x.reshape(x.shape).astype(x.dtype)  # noqa: E731
        return (flat(d.q_decayed, q), flat(d.qk_decayed, qk), flat(d.w, w), d_new_values, flat(d.k_to_end, kd),
                d.state_decay.astype(decay.dtype), ds0)

    recurrence.defvjp(recurrence_fwd, recurrence_bwd)
    return recurrence


chunk_recurrence = with_kernel_vjp(_forward, _backward)
chunk_recurrence.__doc__ = """Rows R = batch x heads: q, w, kd [R,T,dk], qk [R,T,C], u [R,T,dv], decay [R,N] f32,
s0 [R,dk,dv] f32 -> o [R,T,dv] (u's dtype), final state [R,dk,dv] f32. T = N x C."""
