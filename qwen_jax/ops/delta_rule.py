"""Gated delta rule: a step-by-step reference and a chunked (WY) form, both aware of packed segments.

Per batch row and head, with a float32 state S [dk, dv], every step t does
    S <- exp(g_t) S;  delta = beta_t (v_t - S^T k_t);  S <- S + k_t delta^T;  o_t = S^T q_t.
The ops take q and k l2-normalised and q already scaled (the pure rule); the dispatcher
gated_delta_rule can do that first (normalize_qk). With segment_ids (documents packed in a row),
S restarts from zero wherever the id changes. The chunk-local terms (chunk_terms) are shared with
the Pallas kernel in ops/pallas/, for which the chunked op here is the oracle.

Precision of the chunked form: its matmuls take `operand` inputs (float32 or bf16) and accumulate in
float32; the state, the decays, the triangular inverse and every sum stay float32. float32 operands
run at HIGHEST: the oracle. bf16 ones are what fla's kernels use, and by default what bf16 q, k, v
get on GPU and TPU (see matmul_operand).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qwen_jax.ops.triangular import unit_lower_inverse
from qwen_jax.parallel.rules import target_platform

# HIGHEST keeps float32 matmuls float32 on GPU/TPU (no TF32 / bf16 passes); one place to change it.
PRECISION = lax.Precision.HIGHEST

SCANS = ("sequential", "associative")
METHODS = ("chunked", "recurrent", "pallas")


def all_bf16(*arrays) -> bool:
    """Whether every array is bf16 (q, k and v: the chunked forms' matmuls may then take bf16 operands)."""
    return all(x.dtype == jnp.bfloat16 for x in arrays)


def matmul_operand(q, k, v):
    """The chunked form's default matmul operand dtype: bf16 when q, k and v all are and the program runs on
    an accelerator (single-pass MXU / tensor-core matmuls, half the bytes), else float32: XLA:CPU converts
    bf16 operands around its dots (fwd+bwd measured 2-20% slower there)."""
    return jnp.bfloat16 if all_bf16(q, k, v) and target_platform() != "cpu" else jnp.float32


def _einsum(spec, a, b, *, operand=jnp.float32):
    """Two-operand jnp.einsum -> float32: float32 operands at PRECISION, else both rounded to `operand`."""
    if operand == jnp.float32:
        return jnp.einsum(spec, a.astype(operand), b.astype(operand), precision=PRECISION,
                          preferred_element_type=jnp.float32)
    return _rounded_einsum(spec, operand, a.astype(jnp.float32), b.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded_einsum(spec, operand, a, b):
    """einsum of float32 a, b rounded to `operand`, accumulated in float32; its backward rounds the cotangent
    too, so that both of its matmuls also take `operand` inputs (autodiff would pair it, float32, with them)."""
    return _rounded_einsum_forward(spec, operand, a, b)[0]


def _rounded_einsum_forward(spec, operand, a, b):
    a, b = a.astype(operand), b.astype(operand)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _rounded_einsum_backward(spec, operand, residuals, grad):
    # Valid for specs where every index of one operand is in the other or in the output (all of this module's).
    a, b = residuals
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    grad = grad.astype(operand)
    return (jnp.einsum(f"{out},{spec_b}->{spec_a}", grad, b, preferred_element_type=jnp.float32),
            jnp.einsum(f"{spec_a},{out}->{spec_b}", a, grad, preferred_element_type=jnp.float32))


_rounded_einsum.defvjp(_rounded_einsum_forward, _rounded_einsum_backward)


def _masked(x, mask):
    """x where mask holds, else 0; mask None means everything is kept."""
    return x if mask is None else jnp.where(mask, x, 0.0)


def masked_exp(x, mask):
    """exp(x) where mask holds, else 0, without ever evaluating exp where the mask is off (no inf, no NaN grads)."""
    if mask is None:
        return jnp.exp(x)
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def check_inputs(q, k, v, g, beta, initial_state, segment_ids):
    """Raise ValueError unless q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H], state [B,H,dk,dv], ids [B,T]."""
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}, beta {beta.shape}"
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, dk]; got {shapes}")
    batch, seq_len, heads, key_dim = q.shape
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, dv] with q's B, T, H; got {shapes}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {q.shape[:3]}; got {shapes}")
    state_shape = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [B, H, dk, dv] = {state_shape}; got {initial_state.shape} ({shapes})")
    if segment_ids is not None and segment_ids.shape != (batch, seq_len):
        raise ValueError(f"segment_ids must be [B, T] = {(batch, seq_len)}; got {segment_ids.shape} ({shapes})")


def start_state(initial_state, q, v):
    """The given initial state as float32, or zeros [B, H, dk, dv]."""
    if initial_state is not None:
        return initial_state.astype(jnp.float32)
    batch, _, heads, key_dim = q.shape
    return jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)


def _segment_starts(segment_ids):
    """[B, T] ids -> [B, T] bool, True where the id differs from the previous token's (never at t = 0)."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def delta_rule_step(q, k, v, g, beta, state):
    """One token: q, k [B,H,dk], v [B,H,dv], g, beta [B,H], state f32 [B,H,dk,dv] -> o [B,H,dv], new state.

    The rule's step rearranged so that the state is read twice and written once (a decode step is bound by
    the state's bytes): one matmul reads S^T k and S^T q together, and the decay folds into what uses them,
        delta = beta (v - e^g S^T k);  S' = e^g S + k delta^T;  o = S'^T q = e^g S^T q + (k . q) delta.
    """
    decay = jnp.exp(g)[..., None]  # [B, H, 1]
    read = _einsum("bhkv,bhnk->bhnv", state, jnp.stack([k, q], axis=2))  # [B, H, 2, dv]
    delta = beta[..., None] * (v - decay * read[:, :, 0])
    o = decay * read[:, :, 1] + jnp.sum(k * q, axis=-1, keepdims=True) * delta
    return o, decay[..., None] * state + k[..., :, None] * delta[..., None, :]


def recurrent_gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None):
    """Step-by-step reference: q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H] -> o [B,T,H,dv], state [B,H,dk,dv]."""
    check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    batch, seq_len = q.shape[:2]
    if segment_ids is None:
        starts = jnp.zeros((batch, seq_len), bool)
    else:
        starts = _segment_starts(segment_ids)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t, start_t = inputs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        o_t, state = delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state)
        return state, o_t

    def time_major(x):
        return jnp.moveaxis(x, 1, 0).astype(jnp.float32)

    inputs = tuple(map(time_major, (q, k, v, g, beta))) + (jnp.moveaxis(starts, 1, 0),)
    final_state, o = lax.scan(step, start_state(initial_state, q, v), inputs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


def segment_runs(segment_ids, batch, seq_len):
    """[B, T] ids | None -> int32 [B, T]: which run of equal ids each token is in (all 0 without ids).

    Numbering runs (rather than trusting the ids) makes a reused id, e.g. 1, 0, 1, still reset.
    """
    if segment_ids is None:
        return jnp.zeros((batch, seq_len), jnp.int32)
    return jnp.cumsum(_segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def chunk_runs(segment_ids, batch, seq_len, chunk_size, padding):
    """[B, T] ids | None -> per token of each [B, N, C] chunk: its run number, `carried` and `in_last`.

    carried[r]: r is in the segment of the token just before the chunk (for the first chunk: the first
    token's, which owns the initial state). in_last[s]: s is in the chunk's last token's segment, so it
    writes into the outgoing state. Padded positions join the last segment and so never reset anything.
    """
    runs = segment_runs(segment_ids, batch, seq_len)
    run_before = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)[:, ::chunk_size]  # [B, N]
    runs = jnp.pad(runs, ((0, 0), (0, padding)), mode="edge").reshape(batch, -1, chunk_size)
    return runs, runs == run_before[..., None], runs == runs[..., -1:]


def _chunk_masks(segment_ids, chunk_size, padding):
    """Segment masks per chunk, shaped to broadcast over heads: [B,1,N,C,C] same (r and s in one segment),
    [B,1,N,C] carried and in_last (see chunk_runs)."""
    runs, carried, in_last = (x[:, None] for x in chunk_runs(segment_ids, *segment_ids.shape, chunk_size, padding))
    return runs[..., :, None] == runs[..., None, :], carried, in_last


class ChunkTerms(NamedTuple):
    """The chunk-local terms of the WY form per [B, H, N] chunk of C tokens, in the matmul operand dtype
    (state_decay float32).

    The whole rule is then, chunk by chunk with incoming state S [dk, dv]:
        V' = u - w S;   o = q_decayed S + qk_decayed V';   S <- state_decay S + k_to_end^T V'.
    """

    q_decayed: jax.Array  # [B, H, N, C, dk]: q scaled by the decay since the chunk start (0 past a reset)
    qk_decayed: jax.Array  # [B, H, N, C, C]: (q k^T) * Gamma, lower triangular, within one segment
    u: jax.Array  # [B, H, N, C, dv]: (I + A)^-1 diag(beta) V
    w: jax.Array  # [B, H, N, C, dk]: (I + A)^-1 diag(beta exp(G)) K, exp(G) only where the state reaches
    k_to_end: jax.Array  # [B, H, N, C, dk]: K decayed to the chunk's end, 0 outside its last segment
    state_decay: jax.Array  # [B, H, N]: how much of the incoming state the chunk hands on


def chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, *, normalize_qk=False, scale=None,
                operand=None) -> ChunkTerms:
    """q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H], ids [B,T] | None -> ChunkTerms (T padded to N*C).

    normalize_qk: take raw q, k and l2-normalise them first (see normalized_qk). operand: the matmul
    operand dtype (default: matmul_operand of q, k, v).
    """
    operand = matmul_operand(q, k, v) if operand is None else operand
    if normalize_qk:
        q, k = normalized_qk(q, k, scale)
    batch, seq_len, heads, _ = q.shape
    num_chunks = -(-seq_len // chunk_size)
    padding = num_chunks * chunk_size - seq_len

    def to_chunks(x, dtype=jnp.float32):
        """[B, T, H, ...] -> [B, H, N, C, ...] in dtype, zero-padded (beta = 0 keeps padding out of the state)."""
        x = jnp.pad(x.astype(dtype), [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    q_c, k_c, v_c = (to_chunks(x, operand) for x in (q, k, v))
    g_c, beta_c = to_chunks(g), to_chunks(beta)
    if segment_ids is None:
        same, carried, in_last = None, None, None
    else:
        same, carried, in_last = _chunk_masks(segment_ids, chunk_size, padding)

    # Within a chunk, G is the cumulative log-decay; Gamma[r, s] = exp(G_r - G_s) links s <= r of one segment.
    log_decay = jnp.cumsum(g_c, axis=-1)  # [B, H, N, C]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    linked = causal if same is None else causal & same
    gamma = masked_exp(log_decay[..., :, None] - log_decay[..., None, :], linked)
    carried_decay = _masked(jnp.exp(log_decay), carried)  # how much of the incoming state reaches r

    # (I + A) [U | W] = [diag(beta) V | diag(beta exp(G)) K], exp(G) only where the incoming state reaches;
    # A is strictly lower triangular.
    a = jnp.tril(beta_c[..., :, None] * _einsum("bhnrk,bhnsk->bhnrs", k_c, k_c, operand=operand) * gamma, -1)
    rhs = jnp.concatenate([beta_c[..., None] * v_c, (beta_c * carried_decay)[..., None] * k_c], axis=-1)
    solved = _einsum("bhnrs,bhnsd->bhnrd", unit_lower_inverse(a), rhs, operand=operand)
    value_dim = v.shape[-1]

    # What a chunk hands on: exp(G_C) S (if its last token is in the carried segment) plus the writes of its
    # last segment's tokens, decayed to the chunk's end.
    decay_to_end = masked_exp(log_decay[..., -1:] - log_decay, in_last)
    return ChunkTerms(
        q_decayed=(carried_decay[..., None] * q_c).astype(operand),
        qk_decayed=(_einsum("bhnrk,bhnsk->bhnrs", q_c, k_c, operand=operand) * gamma).astype(operand),
        u=solved[..., :value_dim].astype(operand),
        w=solved[..., value_dim:].astype(operand),
        k_to_end=(decay_to_end[..., None] * k_c).astype(operand),
        state_decay=carried_decay[..., -1],
    )


def _chunk_major(x):
    """[B, H, N, ...] -> [N, B, H, ...]: the scans run over the leading axis."""
    return jnp.moveaxis(x, 2, 0)


def _batch_major(x):
    """[N, B, H, ...] -> [B, H, N, ...]."""
    return jnp.moveaxis(x, 0, 2)


def _outputs(terms: ChunkTerms, incoming, new_values):
    """All chunks at once, given their incoming states and V': o = q_decayed S + qk_decayed V' [B,H,N,C,dv]."""
    operand = terms.u.dtype
    o = _einsum("bhnck,bhnkv->bhncv", terms.q_decayed, incoming, operand=operand)
    return o + _einsum("bhnrs,bhnsv->bhnrv", terms.qk_decayed, new_values, operand=operand)


def _sequential_forward(terms: ChunkTerms, state0):
    """lax.scan over chunks of only the state's own work -> (o, final), (incoming states, V') [B,H,N,...].

    The state carried from chunk to chunk stays float32; the residuals are kept as the matmuls read them,
    in the terms' operand dtype.
    """
    operand = terms.u.dtype

    def step(state, chunk):
        u_c, w_c, k_to_end_c, decay_c = chunk
        new_values = u_c - _einsum("bhck,bhkv->bhcv", w_c, state, operand=operand)
        next_state = decay_c[..., None, None] * state + _einsum("bhck,bhcv->bhkv", k_to_end_c, new_values,
                                                                operand=operand)
        return next_state, (state.astype(operand), new_values.astype(operand))

    chunks = tuple(map(_chunk_major, (terms.u, terms.w, terms.k_to_end, terms.state_decay)))
    final_state, (incoming, new_values) = lax.scan(step, state0, chunks)
    incoming, new_values = _batch_major(incoming), _batch_major(new_values)
    return (_outputs(terms, incoming, new_values), final_state), (terms, incoming, new_values)


def _sequential_backward(residuals, grads):
    """The reverse scan carries only the state's gradient; every other gradient is chunk-parallel."""
    terms, incoming, new_values = residuals
    d_out, d_final = grads
    operand = terms.u.dtype
    # What the chunk's outputs send back: to V' (qk^T dO) and to its incoming state (q_decayed^T dO).
    to_new_values = _einsum("bhnrs,bhnrv->bhnsv", terms.qk_decayed, d_out, operand=operand)
    to_state = _einsum("bhnck,bhncv->bhnkv", terms.q_decayed, d_out, operand=operand)

    def step(d_state, chunk):  # d_state: the gradient of the state leaving this chunk
        to_new_values_c, to_state_c, w_c, k_to_end_c, decay_c = chunk
        d_new_values = to_new_values_c + _einsum("bhck,bhkv->bhcv", k_to_end_c, d_state, operand=operand)
        d_incoming = (decay_c[..., None, None] * d_state + to_state_c
                      - _einsum("bhck,bhcv->bhkv", w_c, d_new_values, operand=operand))
        return d_incoming, (d_new_values.astype(operand), d_state.astype(operand))

    chunks = tuple(map(_chunk_major, (to_new_values, to_state, terms.w, terms.k_to_end, terms.state_decay)))
    d_state0, (d_new_values, d_leaving) = lax.scan(step, d_final, chunks, reverse=True)
    d_terms = terms_gradients(d_out, incoming, new_values, _batch_major(d_new_values), _batch_major(d_leaving),
                              operand=operand)
    return jax.tree.map(lambda d, x: d.astype(x.dtype), d_terms, terms), d_state0


def terms_gradients(d_out, incoming, new_values, d_new_values, d_leaving, *, operand) -> ChunkTerms:
    """The chunk terms' gradients once the reverse walk is done, all chunk-parallel, for any leading axes:
    d_out, V', dV' [..., C, dv], incoming states and the gradients of the leaving ones [..., dk, dv]
    -> ChunkTerms of float32 gradients (u's is dV' as given)."""
    return ChunkTerms(
        q_decayed=_einsum("...cv,...kv->...ck", d_out, incoming, operand=operand),
        qk_decayed=_einsum("...rv,...sv->...rs", d_out, new_values, operand=operand),
        u=d_new_values,
        w=-_einsum("...cv,...kv->...ck", d_new_values, incoming, operand=operand),
        k_to_end=_einsum("...cv,...kv->...ck", new_values, d_leaving, operand=operand),
        state_decay=_einsum("...kv,...kv->...", incoming, d_leaving, operand=operand),
    )


@jax.custom_vjp
def _sequential_rule(terms: ChunkTerms, state0):
    """ChunkTerms, incoming state [B,H,dk,dv] -> o [B,H,N,C,dv], final state; the chunk scan in order."""
    return _sequential_forward(terms, state0)[0]


_sequential_rule.defvjp(_sequential_forward, _sequential_backward)


def compose_affine(earlier, later):
    """Two affine state maps S -> M S + B as (M [..., dk, dk], B [..., dk, dv]), earlier first -> one map."""
    (m1, b1), (m2, b2) = earlier, later
    return _einsum("...ij,...jk->...ik", m2, m1), _einsum("...ij,...jv->...iv", m2, b1) + b2


def chunk_maps(u, w, k_to_end, state_decay):
    """Each chunk's affine state map S -> M S + B, for any leading axes: u [..., C, dv], w, k_to_end
    [..., C, dk], state_decay [...] -> (M [..., dk, dk], B [..., dk, dv])."""
    carried_part = state_decay[..., None, None] * jnp.eye(w.shape[-1], dtype=w.dtype)
    return carried_part - _einsum("...ck,...cj->...kj", k_to_end, w), _einsum("...ck,...cv->...kv", k_to_end, u)


def _incoming_states_associative(state0, u, w, k_to_end, state_decay):
    """lax.associative_scan over the chunks' (axis 0) affine maps S -> M S + B; -> ([N,B,H,dk,dv] incoming, final)."""
    transition, offset = lax.associative_scan(compose_affine, chunk_maps(u, w, k_to_end, state_decay))
    after = _einsum("nbhkj,bhjv->nbhkv", transition, state0) + offset  # state after each chunk
    return jnp.concatenate([state0[None], after[:-1]]), after[-1]


def terms_map(terms: ChunkTerms):
    """All chunks' maps composed in order: the affine map of the whole row, ([B,H,dk,dk], [B,H,dk,dv]).

    Each chunk's map is built inside the scan step: all of them at once would be [B,H,N,dk,dk].
    """
    key_dim, value_dim = terms.w.shape[-1], terms.u.shape[-1]
    # Zeros derived from the terms, so that inside shard_map the carry varies over the same axes they do.
    zero = jnp.zeros_like(terms.state_decay[:, :, 0])[..., None, None]  # [B, H, 1, 1]
    identity = (zero + jnp.eye(key_dim, dtype=terms.w.dtype), zero + jnp.zeros((key_dim, value_dim), terms.u.dtype))

    def step(total, chunk):
        return compose_affine(total, chunk_maps(*chunk)), None

    # float32 even when the terms are the kernel's bf16 operands: the composed map carries every chunk's rounding.
    chunks = tuple(_chunk_major(x.astype(jnp.float32)) for x in (terms.u, terms.w, terms.k_to_end, terms.state_decay))
    total, _ = lax.scan(step, identity, chunks)
    return total


def _check_chunking(scan, chunk_size):
    """Raise ValueError on an unknown scan or a chunk size that is not a positive int."""
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}; got {scan!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def rule_from_terms(terms: ChunkTerms, state0, scan="sequential"):
    """ChunkTerms and the incoming state [B,H,dk,dv] -> o float32 [B, N*C, H, dv], final state [B,H,dk,dv]."""
    if scan == "sequential":
        o, final_state = _sequential_rule(terms, state0)
    else:
        incoming, final_state = _incoming_states_associative(
            state0, *map(_chunk_major, (terms.u, terms.w, terms.k_to_end, terms.state_decay)))
        incoming = _batch_major(incoming)
        o = _outputs(terms, incoming, terms.u - _einsum("bhnck,bhnkv->bhncv", terms.w, incoming,
                                                        operand=terms.u.dtype))
    batch, heads, _, _, value_dim = o.shape
    return jnp.moveaxis(o.reshape(batch, heads, -1, value_dim), 1, 2), final_state


def chunked_gated_delta_rule(
    q, k, v, g, beta, *, initial_state=None, segment_ids=None, chunk_size=64, scan="sequential", operand=None
):
    """Chunked WY form: q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H] -> o [B,T,H,dv], state [B,H,dk,dv].

    operand: the matmul operand dtype (default: matmul_operand of q, k, v).
    """
    check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    _check_chunking(scan, chunk_size)
    terms = chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, operand=operand)
    o, final_state = rule_from_terms(terms, start_state(initial_state, q, v), scan)
    return o[:, :q.shape[1]].astype(v.dtype), final_state


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis, in float32 (eps inside the root, as FLA and HF)."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def normalized_qk(q: jax.Array, k: jax.Array, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Raw q, k [..., dk] -> float32 l2-normalised q * scale (default dk^-0.5) and k."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return l2_normalise(q) * scale, l2_normalise(k)


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    initial_state=None,
    segment_ids=None,
    method="chunked",
    chunk_size=64,
    scan="sequential",
    normalize_qk=False,
    scale=None,
    operand=None,
):
    """Dispatch to the chunked, recurrent or Pallas form -> o [B,T,H,dv] (v's dtype), state [B,H,dk,dv].

    normalize_qk: l2-normalise q and k first (in float32; XLA fuses it into the chunk terms, the Pallas
    kernel does it in registers) and scale q by `scale` (default dk^-0.5), so that callers can hand over
    the raw bf16 projections. operand: the chunked form's matmul operand dtype (default: matmul_operand
    of the raw q, k, v); the Pallas kernels take bf16 operands whenever q, k and v are bf16.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    kwargs = dict(initial_state=initial_state, segment_ids=segment_ids)
    if method == "pallas":
        from qwen_jax.ops.pallas.gated_delta_rule import pallas_gated_delta_rule  # the kernel imports this module

        return pallas_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, normalize_qk=normalize_qk,
                                       scale=scale, **kwargs)
    operand = matmul_operand(q, k, v) if operand is None else operand
    if normalize_qk:
        q, k = normalized_qk(q, k, scale)
    if method == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    return chunked_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, scan=scan, operand=operand, **kwargs)
