"""The gated delta rule's chunk-local terms (ops.delta_rule.ChunkTerms) as one fused Pallas kernel, forward
and backward: Triton on GPU, Mosaic on TPU, one kernel body.

One program per (batch, head, chunk) reads the chunk's raw q, k [C, dk] and v [C, dv] once, l2-normalises
and scales q and k in registers, and writes the terms in the [B, H, T, X] layout the recurrence kernel
reads. XLA prepares the small per-token scalars (the cumulative log-decays, the decays that the segment
masks cut, beta) as [C, 1] columns and [1, C] rows, so the body is 2-D throughout, as Mosaic wants, and
XLA's autodiff carries their gradients back to g. On GPU the kernel reads q, k, v in the layer's
[B, T, H, d] layout (no transpose); Mosaic's tiling needs [B, H, T, d]. The triangular inverse (I + A)^-1
uses matmuls only (ops.triangular's doubling: each diagonal block's inverse from its halves'). The
backward kernel recomputes everything from the same inputs, so no [C, C] residual is stored. q k^T and
k k^T take the inputs' dtype as operands (bf16 on the fast path: exact products of the rounded q, k, as
the pure-JAX op sees them); the inverse and the products with it are float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qwen_jax.ops.delta_rule import ChunkTerms, all_bf16, chunk_runs, masked_exp
from qwen_jax.ops.pallas.chunk_recurrence import matmul_f32
from qwen_jax.ops.triangular import doubling_inverse

EPS = 1e-6  # as ops.delta_rule.l2_normalise
FORWARD_WARPS, BACKWARD_WARPS = 4, 8  # the backward holds about twice the live [C, C] and [C, d] tiles


class Options(NamedTuple):
    """The kernels' static settings: chunk length, l2-normalise q and k (then scale q), the operand dtype,
    the platform ("gpu": Triton, q, k, v [B, T, H, d]; "tpu": Mosaic, [B, H, T, d])."""

    chunk: int
    normalize: bool
    scale: float
    operand: str
    platform: str


def _normalized(ref, options: Options, scale: float):
    """A [C, d] block of q or k -> (float32 value as the matmuls see it, its operand-dtype copy, rsqrt factor)."""
    raw = ref[...].astype(jnp.float32)
    factor = None
    if options.normalize:
        factor = lax.rsqrt(jnp.sum(raw * raw, axis=1, keepdims=True) + EPS)
        raw = raw * factor * scale
    operand = raw.astype(options.operand)
    return operand.astype(jnp.float32), operand, factor


class _Chunk(NamedTuple):
    """One chunk's float32 quantities, shared by the forward and backward kernels ([C, 1] columns)."""

    q: jax.Array  # [C, dk], normalised and scaled (rounded to the operand dtype)
    k: jax.Array  # [C, dk]
    q_operand: jax.Array
    k_operand: jax.Array
    q_factor: jax.Array | None  # [C, 1] l2norm rsqrt factors (None without normalize)
    k_factor: jax.Array | None
    v: jax.Array  # [C, dv]
    beta: jax.Array  # [C, 1]
    gamma: jax.Array  # [C, C] exp(G_r - G_s) on s <= r of one segment
    carried_decay: jax.Array  # [C, 1]
    decay_to_end: jax.Array  # [C, 1]
    strictly_lower: jax.Array  # [C, C] bool
    kk: jax.Array  # [C, C] k k^T
    inverse: jax.Array  # [C, C] (I + A)^-1


def _chunk(q_ref, k_ref, v_ref, decay_col_ref, decay_row_ref, beta_ref, carried_ref, to_end_ref, runs_col_ref,
           runs_row_ref, options: Options) -> _Chunk:
    """Read one chunk and form gamma, A and (I + A)^-1 (ops.delta_rule.chunk_terms, per chunk)."""
    q, q_operand, q_factor = _normalized(q_ref, options, options.scale)
    k, k_operand, k_factor = _normalized(k_ref, options, 1.0)
    beta = beta_ref[...]
    size = q.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    linked = (row >= col) & (runs_col_ref[...] == runs_row_ref[...])
    gamma = masked_exp(decay_col_ref[...] - decay_row_ref[...], linked)
    strictly_lower = row > col
    kk = matmul_f32(k_operand, k_operand, trans_b=True)
    a = jnp.where(strictly_lower, beta * kk * gamma, 0.0)
    return _Chunk(q, k, q_operand, k_operand, q_factor, k_factor, v_ref[...].astype(jnp.float32), beta, gamma,
                  carried_ref[...], to_end_ref[...], strictly_lower, kk, doubling_inverse(a, row, col, matmul_f32))


def _forward_kernel(q_ref, k_ref, v_ref, *refs, options):
    """One chunk's q_decayed, qk_decayed, u, w and k_to_end."""
    *scalar_refs, qd_ref, qk_ref, u_ref, w_ref, kd_ref = refs
    c = _chunk(q_ref, k_ref, v_ref, *scalar_refs, options)
    u_ref[...] = matmul_f32(c.inverse, c.beta * c.v).astype(u_ref.dtype)
    w_ref[...] = matmul_f32(c.inverse, c.beta * c.carried_decay * c.k).astype(w_ref.dtype)
    qd_ref[...] = (c.carried_decay * c.q).astype(qd_ref.dtype)
    qk = matmul_f32(c.q_operand, c.k_operand, trans_b=True)
    qk_ref[...] = (qk * c.gamma).astype(qk_ref.dtype)
    kd_ref[...] = (c.decay_to_end * c.k).astype(kd_ref.dtype)


def _l2norm_backward(grad, raw_ref, factor, scale):
    """The gradient wrt raw x [C, d] of y = scale * x * factor (factor = rsqrt(|x|^2 + eps)), from dy [C, d]."""
    if factor is None:
        return grad
    # dx = scale * factor * (dy - x_hat (x_hat . dy)), with x_hat = x * factor unrounded.
    unit = raw_ref[...].astype(jnp.float32) * factor
    return scale * factor * (grad - unit * jnp.sum(unit * grad, axis=1, keepdims=True))


def _row_sum(x):
    """[C, X] -> [C, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


def _backward_kernel(q_ref, k_ref, v_ref, *refs, options):
    """One chunk's gradients wrt raw q, k, v and the per-token scalars, from those of its five terms."""
    scalar_refs, grad_refs = refs[:7], refs[7:12]
    dq_ref, dk_ref, dv_ref, d_decay_col_ref, d_decay_row_ref, dbeta_ref, d_carried_ref, d_to_end_ref = refs[12:]
    c = _chunk(q_ref, k_ref, v_ref, *scalar_refs, options)
    d_qd, d_qk, d_u, d_w, d_kd = (ref[...].astype(jnp.float32) for ref in grad_refs)
    write_scale = c.beta * c.carried_decay
    u = matmul_f32(c.inverse, c.beta * c.v)
    w = matmul_f32(c.inverse, write_scale * c.k)

    # u = T X_u and w = T X_w with T = (I + A)^-1: dX = T^T d(.), and dA = -T^T dT T^T = -(dX_u u^T + dX_w w^T).
    d_xu = matmul_f32(c.inverse, d_u, trans_a=True)
    d_xw = matmul_f32(c.inverse, d_w, trans_a=True)
    d_a = -(matmul_f32(d_xu, u, trans_b=True) + matmul_f32(d_xw, w, trans_b=True))
    d_a = jnp.where(c.strictly_lower, d_a, 0.0)
    # A = beta_r (k k^T) * gamma and qk_decayed = (q k^T) * gamma.
    d_kk = d_a * c.beta * c.gamma
    qk = matmul_f32(c.q_operand, c.k_operand, trans_b=True)
    d_qk_raw = d_qk * c.gamma
    d_gamma = d_a * c.beta * c.kk + d_qk * qk
    d_write = _row_sum(d_xw * c.k)  # d(beta * carried_decay)
    d_beta = _row_sum(d_a * c.kk * c.gamma) + _row_sum(d_xu * c.v) + c.carried_decay * d_write
    d_carried = c.beta * d_write + _row_sum(d_qd * c.q)

    d_q = c.carried_decay * d_qd + matmul_f32(d_qk_raw, c.k)
    d_k = (write_scale * d_xw + matmul_f32(d_qk_raw, c.q, trans_a=True)
           + matmul_f32(d_kk, c.k) + matmul_f32(d_kk, c.k, trans_a=True) + c.decay_to_end * d_kd)
    # gamma = exp(G_r - G_s): its row side and its column side (XLA adds them up).
    spread = d_gamma * c.gamma

    dq_ref[...] = _l2norm_backward(d_q, q_ref, c.q_factor, options.scale).astype(dq_ref.dtype)
    dk_ref[...] = _l2norm_backward(d_k, k_ref, c.k_factor, 1.0).astype(dk_ref.dtype)
    dv_ref[...] = (c.beta * d_xu).astype(dv_ref.dtype)
    d_decay_col_ref[...] = _row_sum(spread)
    d_decay_row_ref[...] = -jnp.sum(spread, axis=0, keepdims=True)
    dbeta_ref[...] = d_beta
    d_carried_ref[...] = d_carried
    d_to_end_ref[...] = _row_sum(d_kd * c.k)


class _Specs(NamedTuple):
    """BlockSpecs of the grid (B, H, N): q, k, v and their gradients, the per-token scalars and theirs,
    the terms [B, H, T, .]."""

    tensors: list
    scalars: list
    scalar_grads: list
    terms: list


def _specs(key_dim: int, value_dim: int, chunk: int, platform: str) -> _Specs:
    if platform == "tpu":  # [B, H, T, d]
        tensor = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    else:  # [B, T, H, d]
        tensor = lambda width: pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))  # noqa: E731
    column = pl.BlockSpec((None, None, chunk, 1), lambda b, h, n: (b, h, n, 0))  # [B, H, T, 1]
    row = pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, n: (b, h, n, 0, 0))  # [B, H, N, 1, C]
    runs_column = pl.BlockSpec((None, chunk, 1), lambda b, h, n: (b, n, 0))  # [B, T, 1]: one for all heads
    runs_row = pl.BlockSpec((None, None, 1, chunk), lambda b, h, n: (b, n, 0, 0))  # [B, N, 1, C]
    term = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    return _Specs([tensor(key_dim), tensor(key_dim), tensor(value_dim)],
                  [column, row, column, column, column, runs_column, runs_row], [column, row, column, column, column],
                  [term(key_dim), term(chunk), term(value_dim), term(key_dim), term(key_dim)])


def _launch(kernel, name, warps, in_specs, out_specs, out_shape, options, grid, interpret, *args):
    """pallas_call over grid (B, H, N) with the platform's compiler settings (warps: Triton's)."""
    if options.platform == "tpu":
        params, name = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3), name + "_tpu"
    else:
        params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
    return pl.pallas_call(functools.partial(kernel, options=options), out_shape=out_shape, grid=grid,
                          in_specs=in_specs, out_specs=out_specs, interpret=interpret, name=name,
                          compiler_params=params)(*args)


def _grid(q, options: Options):
    """(B, H, N) of the padded q in the platform's layout."""
    batch, *middle, _ = q.shape
    length, heads = middle if options.platform != "tpu" else middle[::-1]
    return batch, heads, length // options.chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _terms(q, k, v, scalars, runs, options, interpret):
    """Padded q, k, v (platform layout), scalars (decay column and row, beta, carried decay, decay to the
    end), run ids (column, row) -> q_decayed, qk_decayed, u, w, k_to_end [B, H, T, .] in the operand dtype."""
    batch, heads, num_chunks = _grid(q, options)
    specs = _specs(q.shape[-1], v.shape[-1], options.chunk, options.platform)
    term = lambda width: jax.ShapeDtypeStruct((batch, heads, num_chunks * options.chunk, width),  # noqa: E731
                                              options.operand)
    key_dim = q.shape[-1]
    out_shape = [term(key_dim), term(options.chunk), term(v.shape[-1]), term(key_dim), term(key_dim)]
    return _launch(_forward_kernel, "gdr_chunk_terms", FORWARD_WARPS, specs.tensors + specs.scalars, specs.terms,
                   out_shape, options, (batch, heads, num_chunks), interpret, q, k, v, *scalars, *runs)


def _terms_fwd(q, k, v, scalars, runs, options, interpret):
    return _terms(q, k, v, scalars, runs, options, interpret), (q, k, v, scalars, runs)


def _terms_bwd(options, interpret, inputs, grads):
    q, k, v, scalars, runs = inputs
    specs = _specs(q.shape[-1], v.shape[-1], options.chunk, options.platform)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, *scalars)]
    d_q, d_k, d_v, *d_scalars = _launch(
        _backward_kernel, "gdr_chunk_terms_backward", BACKWARD_WARPS, specs.tensors + specs.scalars + specs.terms,
        specs.tensors + specs.scalar_grads, out_shape, options, _grid(q, options), interpret,
        q, k, v, *scalars, *runs, *grads)
    return d_q, d_k, d_v, tuple(d_scalars), None  # the run ids are integers


_terms.defvjp(_terms_fwd, _terms_bwd)


def fused_chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, *, normalize=False, scale=None,
                      platform="gpu", interpret=False) -> ChunkTerms:
    """q, k [B,T,H,dk] (raw when normalize), v [B,T,H,dv], g, beta [B,T,H], ids [B,T] | None -> ChunkTerms.

    As ops.delta_rule.chunk_terms on l2-normalised q * scale (default dk^-0.5) and k when normalize, with T
    padded to N * C. The terms are bf16 when q, k and v all are (as the recurrence kernel reads them), else
    float32; state_decay is float32.
    """
    batch, seq_len, heads, key_dim = q.shape
    num_chunks = -(-seq_len // chunk_size)
    padding = num_chunks * chunk_size - seq_len
    scale = key_dim**-0.5 if scale is None else float(scale)
    options = Options(chunk_size, normalize, scale if normalize else 1.0,
                      "bfloat16" if all_bf16(q, k, v) else "float32", platform)

    def pad(x):  # zeros: beta = 0 keeps padding out of the state
        return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))

    runs, carried, in_last = chunk_runs(segment_ids, batch, seq_len, chunk_size, padding)  # [B, N, C]
    carried, in_last = carried[..., None], in_last[..., None]  # to broadcast over heads

    def per_chunk(x):  # [B, T, H] -> float32 [B, N, C, H]
        return pad(x.astype(jnp.float32)).reshape(batch, num_chunks, chunk_size, heads)

    log_decay = jnp.cumsum(per_chunk(g), axis=2)
    carried_decay = masked_exp(log_decay, carried)
    decay_to_end = masked_exp(log_decay[:, :, -1:] - log_decay, in_last)

    def column(x):  # [B, N, C, H] -> [B, H, T, 1]
        return jnp.moveaxis(x, 3, 1).reshape(batch, heads, -1, 1)

    scalars = (column(log_decay), jnp.moveaxis(log_decay, 3, 1)[:, :, :, None, :], column(per_chunk(beta)),
               column(carried_decay), column(decay_to_end))
    tensors = (pad(q), pad(k), pad(v))
    if platform == "tpu":
        tensors = tuple(jnp.swapaxes(x, 1, 2) for x in tensors)
    q_decayed, qk_decayed, u, w, k_to_end = _terms(
        *tensors, scalars, (runs.reshape(batch, -1, 1), runs[:, :, None, :]), options, interpret)

    def chunks(x):
        return x.reshape(batch, heads, num_chunks, chunk_size, x.shape[-1])

    # What a chunk hands on of the incoming state: its last token's carried decay.
    state_decay = jnp.moveaxis(carried_decay[:, :, -1], 2, 1)  # [B, H, N]
    return ChunkTerms(chunks(q_decayed), chunks(qk_decayed), chunks(u), chunks(w), chunks(k_to_end), state_decay)
