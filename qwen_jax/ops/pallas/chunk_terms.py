"""The gated delta rule's chunk-local terms (ops.delta_rule.ChunkTerms) as one fused Pallas kernel (Triton
on GPU), forward and backward.

One program per (batch, head, chunk) reads the chunk's raw q, k [C, dk], v [C, dv], g and beta [C] once,
l2-normalises and scales q and k in registers, and writes the terms in the [B, H, T, X] layout the
recurrence kernel reads, so XLA neither materialises the normalised q, k nor transposes anything. The
triangular inverse (I + A)^-1 uses matmuls only: a Neumann product on the 16 x 16 diagonal blocks (whose
powers stay tame in float32), then a short second one for the blocks below them. The backward kernel
recomputes everything from the same inputs, so no [C, C] residual is stored. q k^T and k k^T take the
inputs' dtype as operands (bf16 on the fast path: exact products of the rounded q, k, as the pure-JAX op
sees them); the inverse and the products with it are float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.ops.delta_rule import ChunkTerms, segment_runs
from qwen_jax.ops.pallas.chunk_recurrence import matmul_f32

BLOCK = 16  # diagonal blocks of the triangular inverse, as ops.triangular.BLOCK
EPS = 1e-6  # as ops.delta_rule.l2_normalise
FORWARD_WARPS, BACKWARD_WARPS = 4, 8  # the backward holds about twice the live [C, C] and [C, d] tiles


class Options(NamedTuple):
    """The kernels' static settings: chunk length, l2-normalise q and k (then scale q), the operand dtype."""

    chunk: int
    normalize: bool
    scale: float
    operand: str


def _normalized(ref, options: Options, scale: float):
    """A [C, d] block of q or k -> (float32 value as the matmuls see it, its operand-dtype copy, rsqrt factor)."""
    raw = ref[...].astype(jnp.float32)
    factor = None
    if options.normalize:
        factor = lax.rsqrt(jnp.sum(raw * raw, axis=1, keepdims=True) + EPS)
        raw = raw * factor * scale
    operand = raw.astype(options.operand)
    return operand.astype(jnp.float32), operand, factor


def _masked_exp(x, mask):
    """exp(x) where mask holds, else 0, never evaluating exp where it is off."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _neumann_inverse(a, order: int, eye):
    """(I + a)^-1 for a [n, n] with a^order = 0: (I - a)(I + a^2)(I + a^4)..., float32."""
    power, inverse, reach = -a, eye - a, 2
    while reach < order:
        power = matmul_f32(power, power)
        inverse = inverse + matmul_f32(inverse, power)
        reach *= 2
    return inverse


def _unit_lower_inverse(a, row, col):
    """a [C, C] strictly lower -> (I + a)^-1, with I + a = (I + a_diag)(I + (I + a_diag)^-1 a_below)."""
    size = a.shape[0]
    eye = jnp.where(row == col, 1.0, 0.0)
    in_block = (row // BLOCK) == (col // BLOCK)
    diagonal_inverse = _neumann_inverse(jnp.where(in_block, a, 0.0), BLOCK, eye)
    below = matmul_f32(diagonal_inverse, jnp.where(in_block, 0.0, a))  # strictly block-lower
    return matmul_f32(_neumann_inverse(below, size // BLOCK, eye), diagonal_inverse)


class _Chunk(NamedTuple):
    """One chunk's float32 quantities, shared by the forward and backward kernels."""

    q: jax.Array  # [C, dk], normalised and scaled (rounded to the operand dtype)
    k: jax.Array  # [C, dk]
    q_operand: jax.Array
    k_operand: jax.Array
    q_factor: jax.Array | None  # [C, 1] l2norm rsqrt factors (None without normalize)
    k_factor: jax.Array | None
    v: jax.Array  # [C, dv]
    beta: jax.Array  # [C]
    gamma: jax.Array  # [C, C] exp(G_r - G_s) on s <= r of one segment
    carried_decay: jax.Array  # [C]
    decay_to_end: jax.Array  # [C]
    strictly_lower: jax.Array  # [C, C] bool
    kk: jax.Array  # [C, C] k k^T
    inverse: jax.Array  # [C, C] (I + A)^-1


def _chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, prev_ref, options: Options) -> _Chunk:
    """Read one chunk and form its decays, masks and (I + A)^-1 (ops.delta_rule.chunk_terms, per chunk)."""
    q, q_operand, q_factor = _normalized(q_ref, options, options.scale)
    k, k_operand, k_factor = _normalized(k_ref, options, 1.0)
    g, beta, runs = g_ref[...].astype(jnp.float32), beta_ref[...].astype(jnp.float32), runs_ref[...]
    size = g.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    log_decay = jnp.cumsum(g)
    linked = (row >= col) & (runs[:, None] == runs[None, :])
    gamma = _masked_exp(log_decay[:, None] - log_decay[None, :], linked)
    # Run numbers never decrease, so the run before the chunk is the least of the shifted runs, and the
    # chunk's last run is the greatest of its own.
    carried_decay = _masked_exp(log_decay, runs == jnp.min(prev_ref[...]))
    decay_to_end = _masked_exp(jnp.sum(g) - log_decay, runs == jnp.max(runs))
    strictly_lower = row > col
    kk = matmul_f32(k_operand, k_operand, trans_b=True)
    a = jnp.where(strictly_lower, beta[:, None] * kk * gamma, 0.0)
    return _Chunk(q, k, q_operand, k_operand, q_factor, k_factor, v_ref[...].astype(jnp.float32), beta, gamma,
                  carried_decay, decay_to_end, strictly_lower, kk, _unit_lower_inverse(a, row, col))


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, prev_ref,
                    qd_ref, qk_ref, u_ref, w_ref, kd_ref, *, options):
    """One chunk's q_decayed, qk_decayed, u, w and k_to_end."""
    c = _chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, prev_ref, options)
    u_ref[...] = matmul_f32(c.inverse, c.beta[:, None] * c.v).astype(u_ref.dtype)
    w_ref[...] = matmul_f32(c.inverse, (c.beta * c.carried_decay)[:, None] * c.k).astype(w_ref.dtype)
    qd_ref[...] = (c.carried_decay[:, None] * c.q).astype(qd_ref.dtype)
    qk = matmul_f32(c.q_operand, c.k_operand, trans_b=True)
    qk_ref[...] = (qk * c.gamma).astype(qk_ref.dtype)
    kd_ref[...] = (c.decay_to_end[:, None] * c.k).astype(kd_ref.dtype)


def _l2norm_backward(grad, raw_ref, factor, scale):
    """The gradient wrt raw x [C, d] of y = scale * x * factor (factor = rsqrt(|x|^2 + eps)), from dy [C, d]."""
    if factor is None:
        return grad
    # dx = scale * factor * (dy - x_hat (x_hat . dy)), with x_hat = x * factor unrounded.
    unit = raw_ref[...].astype(jnp.float32) * factor
    return scale * factor * (grad - unit * jnp.sum(unit * grad, axis=1, keepdims=True))


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, prev_ref,
                     dqd_ref, dqk_ref, du_ref, dw_ref, dkd_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, options):
    """One chunk's gradients wrt raw q, k, v, g and beta, from those of its five terms."""
    c = _chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, prev_ref, options)
    d_qd, d_qk, d_u, d_w, d_kd = (ref[...].astype(jnp.float32)
                                  for ref in (dqd_ref, dqk_ref, du_ref, dw_ref, dkd_ref))
    write_scale = c.beta * c.carried_decay
    u = matmul_f32(c.inverse, c.beta[:, None] * c.v)
    w = matmul_f32(c.inverse, write_scale[:, None] * c.k)

    # u = T X_u and w = T X_w with T = (I + A)^-1: dX = T^T d(.), and dA = -T^T dT T^T = -(dX_u u^T + dX_w w^T).
    d_xu = matmul_f32(c.inverse, d_u, trans_a=True)
    d_xw = matmul_f32(c.inverse, d_w, trans_a=True)
    d_a = -(matmul_f32(d_xu, u, trans_b=True) + matmul_f32(d_xw, w, trans_b=True))
    d_a = jnp.where(c.strictly_lower, d_a, 0.0)
    # A = beta_r (k k^T) * gamma and qk_decayed = (q k^T) * gamma.
    d_kk = d_a * c.beta[:, None] * c.gamma
    qk = matmul_f32(c.q_operand, c.k_operand, trans_b=True)
    d_qk_raw = d_qk * c.gamma
    d_gamma = d_a * c.beta[:, None] * c.kk + d_qk * qk
    d_beta = jnp.sum(d_a * c.kk * c.gamma, axis=1) + jnp.sum(d_xu * c.v, axis=1)
    d_write = jnp.sum(d_xw * c.k, axis=1)  # d(beta * carried_decay)
    d_beta = d_beta + c.carried_decay * d_write
    d_carried = c.beta * d_write + jnp.sum(d_qd * c.q, axis=1)

    d_q = c.carried_decay[:, None] * d_qd + matmul_f32(d_qk_raw, c.k)
    d_k = (write_scale[:, None] * d_xw + matmul_f32(d_qk_raw, c.q, trans_a=True)
           + matmul_f32(d_kk, c.k) + matmul_f32(d_kk, c.k, trans_a=True) + c.decay_to_end[:, None] * d_kd)

    # Log-decays: gamma's exp(G_r - G_s), carried_decay's exp(G_r), decay_to_end's exp(G_last - G_r).
    spread = d_gamma * c.gamma
    d_to_end = jnp.sum(d_kd * c.k, axis=1) * c.decay_to_end
    d_log_decay = jnp.sum(spread, axis=1) - jnp.sum(spread, axis=0) + d_carried * c.carried_decay - d_to_end
    # G = cumsum(g) and G_last = sum(g): dg_j = sum_{i >= j} dG_i + dG_last (a reverse cumsum, from a forward one).
    d_g = jnp.sum(d_log_decay) - jnp.cumsum(d_log_decay) + d_log_decay + jnp.sum(d_to_end)

    dq_ref[...] = _l2norm_backward(d_q, q_ref, c.q_factor, options.scale).astype(dq_ref.dtype)
    dk_ref[...] = _l2norm_backward(d_k, k_ref, c.k_factor, 1.0).astype(dk_ref.dtype)
    dv_ref[...] = (c.beta[:, None] * d_xu).astype(dv_ref.dtype)
    dg_ref[...] = d_g.astype(dg_ref.dtype)
    dbeta_ref[...] = d_beta.astype(dbeta_ref.dtype)


class _Specs(NamedTuple):
    """BlockSpecs of the grid (B, H, N): the inputs (per token [B, T, H, .], run ids [B, T]), the terms
    [B, H, T, .], and the inputs' gradients."""

    inputs: list
    terms: list
    grads: list


def _specs(key_dim: int, value_dim: int, chunk: int) -> _Specs:
    token = lambda width: pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))  # noqa: E731
    scalar = pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h))
    runs = pl.BlockSpec((None, chunk), lambda b, h, n: (b, n))
    term = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    per_token = [token(key_dim), token(key_dim), token(value_dim), scalar, scalar]
    return _Specs(per_token + [runs, runs], [term(key_dim), term(chunk), term(value_dim), term(key_dim),
                                             term(key_dim)], per_token)


def _launch(kernel, name, warps, in_specs, out_specs, out_shape, q, options, interpret, *args):
    """pallas_call over the grid (B, H, N) of the padded q [B, T, H, dk]."""
    batch, length, heads, _ = q.shape
    return pl.pallas_call(
        functools.partial(kernel, options=options), out_shape=out_shape, grid=(batch, heads, length // options.chunk),
        in_specs=in_specs, out_specs=out_specs, interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _terms(q, k, v, g, beta, runs, prev_runs, options, interpret):
    """Padded q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H], run ids [B,T] -> q_decayed, qk_decayed, u, w,
    k_to_end [B, H, T, .] in the operand dtype."""
    batch, length, heads, key_dim = q.shape
    specs = _specs(key_dim, v.shape[-1], options.chunk)
    term = lambda width: jax.ShapeDtypeStruct((batch, heads, length, width), options.operand)  # noqa: E731
    out_shape = [term(key_dim), term(options.chunk), term(v.shape[-1]), term(key_dim), term(key_dim)]
    return _launch(_forward_kernel, "gdr_chunk_terms", FORWARD_WARPS, specs.inputs, specs.terms, out_shape,
                   q, options, interpret, q, k, v, g, beta, runs, prev_runs)


def _terms_fwd(q, k, v, g, beta, runs, prev_runs, options, interpret):
    return _terms(q, k, v, g, beta, runs, prev_runs, options, interpret), (q, k, v, g, beta, runs, prev_runs)


def _terms_bwd(options, interpret, inputs, grads):
    q, k, v, g, beta, _, _ = inputs
    specs = _specs(q.shape[-1], v.shape[-1], options.chunk)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g, beta)]
    d_inputs = _launch(_backward_kernel, "gdr_chunk_terms_backward", BACKWARD_WARPS, specs.inputs + specs.terms,
                       specs.grads, out_shape, q, options, interpret, *inputs, *grads)
    return (*d_inputs, None, None)  # the run ids are integers


_terms.defvjp(_terms_fwd, _terms_bwd)


def fused_chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, *, normalize=False, scale=None,
                      interpret=False) -> ChunkTerms:
    """q, k [B,T,H,dk] (raw when normalize), v [B,T,H,dv], g, beta [B,T,H], ids [B,T] | None -> ChunkTerms.

    As ops.delta_rule.chunk_terms on l2-normalised q * scale (default dk^-0.5) and k when normalize, with T
    padded to N * C. The terms are bf16 when q, k and v all are (as the recurrence kernel reads them), else
    float32; state_decay is float32.
    """
    batch, seq_len, heads, key_dim = q.shape
    num_chunks = -(-seq_len // chunk_size)
    padding = num_chunks * chunk_size - seq_len
    all_bf16 = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    scale = key_dim**-0.5 if scale is None else float(scale)
    options = Options(chunk_size, normalize, scale if normalize else 1.0, "bfloat16" if all_bf16 else "float32")

    def pad(x):  # zeros: beta = 0 keeps padding out of the state
        return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))

    runs = segment_runs(segment_ids, batch, seq_len)
    prev_runs = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)
    # Edge padding: padded positions join the last run.
    runs, prev_runs = (jnp.pad(x, ((0, 0), (0, padding)), mode="edge") for x in (runs, prev_runs))
    g, beta = pad(g.astype(jnp.float32)), pad(beta.astype(jnp.float32))
    q_decayed, qk_decayed, u, w, k_to_end = _terms(pad(q), pad(k), pad(v), g, beta, runs, prev_runs, options,
                                                   interpret)

    # What a chunk hands on of the incoming state: exp(G_last) if its last token is still in the carried run.
    carried = runs[:, chunk_size - 1::chunk_size] == prev_runs[:, ::chunk_size]  # [B, N]
    chunk_decay = jnp.exp(jnp.sum(g.reshape(batch, num_chunks, chunk_size, heads), axis=2))  # [B, N, H]
    state_decay = jnp.moveaxis(jnp.where(carried[..., None], chunk_decay, 0.0), 2, 1)

    def chunks(x):
        return x.reshape(batch, heads, num_chunks, chunk_size, x.shape[-1])

    return ChunkTerms(chunks(q_decayed), chunks(qk_decayed), chunks(u), chunks(w), chunks(k_to_end), state_decay)
