"""Gated delta rule: chunked == recurrent, both scans agree, gradients agree, packed == one-by-one, state carries."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import all_eqns

from qwen_jax.ops.delta_rule import (chunked_gated_delta_rule, delta_rule_step, gated_delta_rule, matmul_operand,
                                     recurrent_gated_delta_rule)
from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding
from qwen_jax.train.compile_check import tpu_topology

B, T, H, DK, DV = 2, 150, 3, 16, 24
CHUNK = 32  # T = 150 spans four full chunks and a partial one

# Through the dispatcher, so it is exercised too; compiled once per shape and reused across tests.
recurrent = jax.jit(functools.partial(gated_delta_rule, method="recurrent"))
chunked = jax.jit(functools.partial(gated_delta_rule, method="chunked"), static_argnames=("chunk_size", "scan"))


def make_inputs(seed, batch=B, seq_len=T):
    """Random float32 q, k [b,t,H,DK], v [b,t,H,DV], g, beta [b,t,H], state [b,H,DK,DV], as the layer feeds them."""
    # NumPy, not jax.random: eager jax ops would each compile, which dominates a test file this small.
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, batch, seq_len, H, DK))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * DK**-0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((batch, seq_len, H, DV))
    g = -0.3 * np.logaddexp(0.0, rng.standard_normal((batch, seq_len, H)))  # -0.3 softplus: exp(g) in ~(0.5, 1)
    beta = 1 / (1 + np.exp(-rng.standard_normal((batch, seq_len, H))))
    state = rng.standard_normal((batch, H, DK, DV))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, state))


def assert_close(actual, expected, tol):
    """Max abs error within tol times the largest |expected| (a relative bound that ignores tiny entries)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert error <= tol * scale, f"max error {error:.3g} > {tol:g} * {scale:.3g}"


def packed_segment_ids():
    """[2, 160]: row 0 packs documents 40, 70, 37 then 13 padding (id 0); row 1 packs 64, 96 (a chunk-aligned cut)."""
    rows = [[(1, 40), (2, 70), (3, 37), (0, 13)], [(7, 64), (8, 96)]]
    return jnp.asarray([np.repeat([i for i, _ in row], [n for _, n in row]) for row in rows], jnp.int32), rows


@pytest.mark.parametrize("scan", ["sequential", "associative"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(scan, with_state):
    q, k, v, g, beta, state = make_inputs(0)
    initial_state = state if with_state else None
    expected_o, expected_state = recurrent(q, k, v, g, beta, initial_state=initial_state)
    o, final_state = chunked(q, k, v, g, beta, initial_state=initial_state, chunk_size=CHUNK, scan=scan)
    assert o.shape == v.shape and final_state.shape == (B, H, DK, DV)
    assert_close(o, expected_o, 1e-5)
    assert_close(final_state, expected_state, 1e-5)


def test_sequential_matches_associative():
    q, k, v, g, beta, state = make_inputs(1, seq_len=160)
    segment_ids, _ = packed_segment_ids()
    kwargs = dict(initial_state=state, segment_ids=segment_ids, chunk_size=CHUNK)
    o_seq, state_seq = chunked(q, k, v, g, beta, scan="sequential", **kwargs)
    o_assoc, state_assoc = chunked(q, k, v, g, beta, scan="associative", **kwargs)
    assert_close(o_assoc, o_seq, 1e-6)
    assert_close(state_assoc, state_seq, 1e-6)


def weighted_sum(rule, q, k, v, g, beta, state, segment_ids, out_weights, state_weights):
    """A scalar that depends on every output and final-state entry, to differentiate."""
    o, final_state = rule(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids)
    return jnp.sum(o * out_weights) + jnp.sum(final_state * state_weights)


# Module level, so the recurrent gradient compiles once for both scans.
weighted_sum_grads = jax.jit(jax.grad(weighted_sum, argnums=range(1, 7)), static_argnums=0)


@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_gradients_match_recurrent(scan):
    inputs = make_inputs(2, seq_len=100)
    segment_ids = jnp.asarray(np.repeat([[1, 2, 0]], [45, 50, 5], axis=1).repeat(B, axis=0), jnp.int32)
    rng = np.random.default_rng(3)
    weights = rng.standard_normal(inputs[2].shape), rng.standard_normal(inputs[5].shape)
    expected = weighted_sum_grads(recurrent_gated_delta_rule, *inputs, segment_ids, *weights)
    chunked_rule = functools.partial(chunked_gated_delta_rule, chunk_size=CHUNK, scan=scan)
    actual = weighted_sum_grads(chunked_rule, *inputs, segment_ids, *weights)
    for name, grad, expected_grad in zip(["q", "k", "v", "g", "beta", "initial_state"], actual, expected):
        assert np.isfinite(grad).all(), name
        assert_close(grad, expected_grad, 1e-5)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_packed_matches_one_by_one(method):
    segment_ids, rows = packed_segment_ids()
    row_len = segment_ids.shape[1]
    q, k, v, g, beta, state = make_inputs(5, seq_len=row_len)
    rule = chunked if method == "chunked" else recurrent
    kwargs = dict(chunk_size=CHUNK, scan="sequential") if method == "chunked" else {}
    o, final_state = rule(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids, **kwargs)

    # Every document alone, without segment_ids, as one batch (one compile): each is right-padded to the row
    # length with zeros, and beta = g = 0 there leaves the state untouched. The initial state belongs to the
    # row's first document; every later one starts from zero.
    documents, alone_inputs, alone_states, last_of_row = [], [], [], []
    for row, lengths in enumerate(rows):
        start = 0
        for document, (_, length) in enumerate(lengths):
            documents.append((row, start, length))
            alone_inputs.append([x[row, start : start + length] for x in (q, k, v, g, beta)])
            alone_states.append(state[row] if document == 0 else jnp.zeros_like(state[row]))
            start += length
        last_of_row.append(len(documents) - 1)
    alone = [
        jnp.stack([jnp.pad(x, [(0, row_len - x.shape[0])] + [(0, 0)] * (x.ndim - 1)) for x in xs])
        for xs in zip(*alone_inputs)
    ]
    alone_o, alone_final = rule(*alone, initial_state=jnp.stack(alone_states), **kwargs)

    for i, (row, start, length) in enumerate(documents):
        assert_close(o[row, start : start + length], alone_o[i, :length], 1e-5)
    # A row's final state is its last segment's (in row 0, the padding's).
    assert_close(final_state, alone_final[np.array(last_of_row)], 1e-5)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_split_sequence_continues_from_state(method):
    q, k, v, g, beta, state = make_inputs(6)
    split = T // 2  # 75: not a multiple of CHUNK, and both halves share one compiled shape
    # The module-level jits: the whole run is then test_chunked_matches_recurrent's, already compiled.
    rule = chunked if method == "chunked" else recurrent
    kwargs = dict(chunk_size=CHUNK, scan="sequential") if method == "chunked" else {}
    whole_o, whole_state = rule(q, k, v, g, beta, initial_state=state, **kwargs)
    first = [x[:, :split] for x in (q, k, v, g, beta)]
    second = [x[:, split:] for x in (q, k, v, g, beta)]
    first_o, middle_state = rule(*first, initial_state=state, **kwargs)
    second_o, final_state = rule(*second, initial_state=middle_state, **kwargs)
    assert_close(jnp.concatenate([first_o, second_o], axis=1), whole_o, 1e-5)
    assert_close(final_state, whole_state, 1e-5)


def test_one_step_equals_the_rule_as_written_and_reads_the_state_in_one_matmul():
    *token, state = make_inputs(12, seq_len=1)
    q, k, v, g, beta = (x[:, 0] for x in token)
    o, new_state = jax.jit(delta_rule_step)(q, k, v, g, beta, state)
    # The rule in float64, in its textbook order: decay, read, write, read.
    q64, k64, v64, g64, beta64, s = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, state))
    s = np.exp(g64)[..., None, None] * s
    delta = beta64[..., None] * (v64 - np.einsum("bhkv,bhk->bhv", s, k64))
    s = s + k64[..., :, None] * delta[..., None, :]
    assert_close(new_state, s, 1e-6)
    assert_close(o, np.einsum("bhkv,bhk->bhv", s, q64), 1e-6)
    # A decode step is bound by the state's bytes: one matmul reads it (for S^T k and S^T q together).
    jaxpr = jax.make_jaxpr(delta_rule_step)(q, k, v, g, beta, state).jaxpr
    assert sum(state.shape in shapes for _, shapes in dot_operands(jaxpr)) == 1


def test_output_dtype_follows_v_and_state_stays_float32():
    q, k, v, g, beta, state = make_inputs(7, seq_len=20)
    for rule in (chunked_gated_delta_rule, recurrent_gated_delta_rule):
        o, final_state = jax.eval_shape(rule, q, k, v.astype(jnp.bfloat16), g, beta, initial_state=state)
        assert o.dtype == jnp.bfloat16 and final_state.dtype == jnp.float32


@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_bf16_operands_stay_within_budget_of_the_float32_oracle(scan):
    inputs = make_inputs(9, seq_len=160)
    segment_ids, _ = packed_segment_ids()
    # bf16 q, k, v; the oracle takes the same rounded values as float32, so only the operand rounding differs.
    rounded = [x.astype(jnp.bfloat16) for x in inputs[:3]]
    rng = np.random.default_rng(10)
    weights = rng.standard_normal(inputs[2].shape), rng.standard_normal(inputs[5].shape)

    def run(operand, q, k, v):
        rule = functools.partial(chunked_gated_delta_rule, chunk_size=CHUNK, scan=scan, operand=operand)
        outputs = jax.jit(rule)(q, k, v, *inputs[3:5], initial_state=inputs[5], segment_ids=segment_ids)
        grads = jax.jit(jax.grad(weighted_sum, argnums=range(1, 7)), static_argnums=0)(
            rule, q, k, v, *inputs[3:], segment_ids, *weights)
        return outputs, grads

    (o, state), grads = run(jnp.bfloat16, *rounded)
    (expected_o, expected_state), expected_grads = run(jnp.float32, *(x.astype(jnp.float32) for x in rounded))
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    # bf16 operands with float32 accumulation, as fla's kernels: about 2^-8 relative (measured 1.5e-3 to 5e-3).
    assert_close(o, expected_o, 2e-2)
    assert_close(state, expected_state, 2e-2)
    for name, grad, expected_grad in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, expected_grads):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), name
        assert_close(grad, expected_grad, 2e-2)


def dot_operands(jaxpr):
    """({operand dtypes}, [shapes]) of every dot_general in a jaxpr and the jaxprs inside it (scans,
    custom VJPs, jits)."""
    for eqn in all_eqns(jaxpr):
        if eqn.primitive.name == "dot_general":
            yield {v.aval.dtype for v in eqn.invars}, [v.aval.shape for v in eqn.invars]


@pytest.mark.parametrize("operand", [jnp.bfloat16, jnp.float32])
def test_every_matmul_over_head_dims_takes_the_operand_dtype(operand):
    # Head dims 40 and 24 differ from the chunk (32) and the triangular inverse's blocks (16): only the
    # inverse, [C, C] and smaller, keeps float32 operands whatever the operand dtype.
    rng = np.random.default_rng(11)
    q, k = (jnp.asarray(rng.standard_normal((1, 64, 2, 40)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, 64, 2, 24)), jnp.bfloat16)
    g, beta = (jnp.asarray(rng.uniform(-1, 0, (1, 64, 2)), jnp.float32) for _ in range(2))

    def loss(q, k, v, g, beta):
        o, state = gated_delta_rule(q, k, v, g, beta, chunk_size=CHUNK, normalize_qk=True, operand=operand)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    dots = list(dot_operands(jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(q, k, v, g, beta).jaxpr))
    over_heads = [dtypes for dtypes, shapes in dots if {40, 24} & {size for shape in shapes for size in shape}]
    assert len(over_heads) > 14  # the forward's 7 (4 of them in and after the scan) and the backward's
    assert set().union(*over_heads) == {np.dtype(operand)}
    assert set().union(*(dtypes for dtypes, _ in dots)) >= {np.dtype(jnp.float32)}  # the inverse stays float32


def test_matmul_operand_is_bf16_for_bf16_inputs_on_accelerators_only():
    x = jnp.zeros((1, 4, 1, 16), jnp.bfloat16)
    assert matmul_operand(x, x, x) == jnp.float32  # on this CPU: XLA:CPU's bf16 dots are slower
    tpu_mesh = jax.sharding.Mesh(np.array(tpu_topology("v5p:1x1x1").devices), ("data",))
    with activation_sharding(tpu_mesh, DEFAULT_RULES):
        assert matmul_operand(x, x, x) == jnp.bfloat16
        assert matmul_operand(x, x, x.astype(jnp.float32)) == jnp.float32


def test_bad_arguments_raise_value_error():
    q, k, v, g, beta, state = make_inputs(8, seq_len=10)
    with pytest.raises(ValueError, match=r"scan must be one of .*'parallel'"):
        chunked_gated_delta_rule(q, k, v, g, beta, scan="parallel")
    with pytest.raises(ValueError, match=r"method must be one of .*'fast'"):
        gated_delta_rule(q, k, v, g, beta, method="fast")
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, dv\].*q \(2, 10, 3, 16\).*v \(2, 9, 3, 24\)"):
        chunked_gated_delta_rule(q, k, v[:, :9], g, beta)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\].*beta \(2, 10\)"):
        recurrent_gated_delta_rule(q, k, v, g, beta[..., 0])
    with pytest.raises(ValueError, match=r"initial_state must be .*\(2, 3, 16, 24\); got \(2, 3, 24, 16\)"):
        chunked_gated_delta_rule(q, k, v, g, beta, initial_state=state.transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \(2, 10\); got \(2, 9\)"):
        recurrent_gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.ones((2, 9), jnp.int32))
