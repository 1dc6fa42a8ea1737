"""The Pallas gated delta rule (interpret mode on CPU) == the pure-JAX chunked op: values and gradients,
for the Triton (GPU) and the Mosaic (TPU) kernels.

Production tiling: dk = dv = 128, chunks of 64, value blocks of 64 on GPU (two per head) and 128 on TPU,
several chunks per row, packed segments (one cut on a chunk edge, a reused id, padding) and an initial
state. The TPU kernels also compile for a real TPU (XLA:TPU through libtpu, on this CPU host). On a
4-device mesh the layer runs the kernels inside shard_map and matches the pure-JAX layer on one device.
The decode step kernel (GPU) steps one group of the stacked state in place and decodes like XLA's step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_walk import all_eqns
from layer_parity import assert_same_layer, out_and_grads

from qwen_jax import ModelConfig, Qwen35ForCausalLM, preset
from qwen_jax.config import ConfigError
from qwen_jax.model.gated_deltanet import GatedDeltaNet, gdn_method
from qwen_jax.generate.engine import generate
from qwen_jax.ops.delta_rule import delta_rule_step, gated_delta_rule, l2_normalise
from qwen_jax.ops.pallas.decode_step import pallas_delta_rule_step
from qwen_jax.ops.pallas.gated_delta_rule import check_kernel_shapes, default_block_v, pallas_gated_delta_rule
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES, param_shardings
from qwen_jax.train.compile_check import tpu_topology

B, T, H, D = 2, 200, 2, 128  # T = 200: three full chunks of 64 and a partial one


def make_inputs(seed, dtype=jnp.float32):
    """Raw (not normalised) q, k, v [B,T,H,D] in dtype; float32 g, beta [B,T,H] and state [B,H,D,D]."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(x, dtype) for x in rng.standard_normal((3, B, T, H, D)))
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((B, T, H))), jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), jnp.float32)
    state = jnp.asarray(0.1 * rng.standard_normal((B, H, D, D)), jnp.float32)
    return q, k, v, g, beta, state


def segment_ids():
    """Row 0: documents of 64 (cut on a chunk edge), 70, 50, then 16 padding; row 1: ids 1, 2, 1 (reused)."""
    rows = [np.repeat([1, 2, 3, 0], [64, 70, 50, 16]), np.repeat([1, 2, 1], [90, 30, 80])]
    return jnp.asarray(np.stack(rows), jnp.int32)


def tpu_rule(q, k, v, g, beta, **kwargs):
    """gated_delta_rule(method="pallas", normalize_qk=True) with the TPU kernel (interpreted here)."""
    q, k = l2_normalise(q) * q.shape[-1] ** -0.5, l2_normalise(k)
    return pallas_gated_delta_rule(q, k, v, g, beta, platform="tpu", **kwargs)


def rule_for(kernel):
    """The rule as gated_delta_rule(method=kernel, normalize_qk=True) takes it; "pallas-tpu": the TPU kernels,
    "pallas-fused": the GPU ones with the fused chunk-terms kernel (the GPU default takes XLA's terms)."""
    if kernel == "pallas-tpu":
        return tpu_rule
    if kernel == "pallas-fused":
        return functools.partial(pallas_gated_delta_rule, normalize_qk=True, platform="gpu", fused_terms=True)
    return functools.partial(gated_delta_rule, method=kernel, normalize_qk=True)


def weighted_loss(method, q, k, v, g, beta, state, ids, weights):
    """A scalar that depends on every output and on the final state, so every gradient path is checked."""
    rule = rule_for(method)
    o, final = rule(q, k, v, g, beta, initial_state=state, segment_ids=ids)
    return jnp.sum(o.astype(jnp.float32) * weights) + jnp.sum(final * final)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(method, *args):
    return jax.value_and_grad(functools.partial(weighted_loss, method), argnums=range(6))(*args)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.mark.parametrize("kernel", ["pallas", "pallas-fused", "pallas-tpu"])
def test_pallas_matches_chunked_in_float32(kernel):
    *inputs, state = make_inputs(0)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
    args = (*inputs, state, segment_ids(), weights)
    expected_loss, expected_grads = loss_and_grads("chunked", *args)
    loss, grads = loss_and_grads(kernel, *args)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for name, grad, expected in zip(("q", "k", "v", "g", "beta", "state"), grads, expected_grads):
        assert relative_error(grad, expected) < 1e-5, name


@pytest.mark.parametrize("kernel", ["pallas", "pallas-fused", "pallas-tpu"])
def test_pallas_bf16_operands_stay_within_bf16_error(kernel):
    """bf16 q/k/v and bf16 matmul operands against the float32 op on the same (rounded) inputs."""
    q, k, v, g, beta, state = make_inputs(2, jnp.bfloat16)
    o, final = jax.jit(rule_for(kernel))(q, k, v, g, beta, initial_state=state, segment_ids=segment_ids())
    assert o.dtype == jnp.bfloat16
    expected_o, expected_final = jax.jit(functools.partial(gated_delta_rule, normalize_qk=True))(
        *(x.astype(jnp.float32) for x in (q, k, v)), g, beta, initial_state=state, segment_ids=segment_ids())
    assert relative_error(o, expected_o) < 1e-2
    assert relative_error(final, expected_final) < 1e-2


@pytest.mark.parametrize("value_dim", [256, 192])
def test_tpu_kernel_on_value_heads_wider_than_a_lane_block(value_dim):
    """dv = 256 in two 128-lane blocks, each walking its slice of the state (the gradients shared by the
    blocks, dq, dk, dg, dbeta, come from products over the whole head after the walks). dv = 192, which
    128 lanes do not divide: one block of the whole head."""
    rng = np.random.default_rng(4)
    q, k = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, 1, 128, 1, 128)))
    v = jnp.asarray(rng.standard_normal((1, 128, 1, value_dim)), jnp.float32)
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((1, 128, 1))), jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((1, 128, 1)))), jnp.float32)

    def loss(rule, *args):
        o, final = rule(*args)
        return jnp.sum(o * jnp.arange(float(value_dim)) / value_dim) + jnp.sum(final * final)

    grads = {name: jax.jit(jax.grad(functools.partial(loss, rule), argnums=range(5)))(q, k, v, g, beta)
             for name, rule in (("chunked", functools.partial(gated_delta_rule, normalize_qk=True)),
                                ("tpu", tpu_rule))}
    # dk is the touchiest here (the l2-normalisation's backward): the Triton kernel and the
    # token-by-token recurrence sit as far from the chunked op (2.3e-5, 2.5e-5) as this kernel.
    for name, got, want in zip("qkvgb", grads["tpu"], grads["chunked"]):
        assert relative_error(got, want) < 1e-4, name


@pytest.mark.parametrize("value_dim", [128, 192])
def test_tpu_kernels_compile_for_a_v5p_chip(value_dim):
    """XLA:TPU (libtpu, on this CPU host) compiles the bf16 forward and backward kernels, the chunk terms'
    and the recurrence's: Mosaic takes their block shapes (dv = 192: one block of the whole head), the SMEM
    decays, the [C, 1] and [1, C] scalar blocks and the transposed-operand matmuls."""
    device = tpu_topology("v5p:2x2x1").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = [jax.ShapeDtypeStruct((1, 256, 2, dim), jnp.bfloat16, sharding=sharding) for dim in (128, 128, value_dim)]
    shapes += [jax.ShapeDtypeStruct((1, 256, 2), jnp.float32, sharding=sharding)] * 2

    def loss(*args):
        o, final = pallas_gated_delta_rule(*args, platform="tpu", interpret=False)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

    compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*shapes).compile().as_text()
    for kernel in ("gdr_chunk_terms_tpu", "gdr_chunk_terms_backward_tpu", "gdr_chunk_forward_tpu",
                   "gdr_chunk_backward_tpu"):
        assert kernel in compiled, kernel


def test_kernel_shape_limits_are_named():
    with pytest.raises(ValueError, match="key head dim"):
        check_kernel_shapes(96, 128, 64, 64)
    with pytest.raises(ValueError, match="value head dim"):
        check_kernel_shapes(128, 96, 64, 32)  # the terms kernel holds a whole value head
    with pytest.raises(ValueError, match="multiple of block_v"):
        check_kernel_shapes(128, 64, 64, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_kernel_shapes(128, 128, 60, 128, platform="tpu")
    with pytest.raises(ValueError, match="multiple of 128"):
        check_kernel_shapes(128, 256, 64, 64, platform="tpu")
    check_kernel_shapes(96, 96, 40, 96, platform="tpu")  # whole dims: these compile for v5p too
    assert default_block_v(192, "tpu") == 192 and default_block_v(256, "tpu") == 128


def test_gdn_impl_resolution():
    assert gdn_method(preset("tiny")) == "chunked"  # auto off the GPU
    assert gdn_method(preset("tiny", gdn_impl="pallas")) == "pallas"
    assert gdn_method(preset("tiny", gdn_impl="jax")) == "chunked"
    with pytest.raises(ConfigError, match="model.gdn_impl"):
        gdn_method(preset("tiny", gdn_impl="pallas", linear_key_head_dim=24))
    with pytest.raises(ConfigError, match="model.gdn_impl"):
        ModelConfig(gdn_impl="triton")


@nnx.jit
def model_loss_and_grads(model, ids, segments):
    def loss(model):
        return jnp.mean(model(ids, segment_ids=segments).logits ** 2)
    return nnx.value_and_grad(loss)(model)


def test_model_with_pallas_gdn_matches_pure_jax():
    """The tiny model's logits and gradients with gdn_impl pallas (interpreted) == with the pure-JAX op."""
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 200, (2, 80)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1, 2]], [50, 30], axis=1).repeat(2, 0), jnp.int32)
    results = []
    for impl in ("jax", "pallas"):
        model = Qwen35ForCausalLM(preset("tiny", gdn_impl=impl), rngs=nnx.Rngs(0))
        results.append(model_loss_and_grads(model, ids, segments))  # compiled, not op by op
    (expected_loss, expected_grads), (loss, grads) = results
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for expected, actual in zip(jax.tree.leaves(nnx.state(expected_grads)), jax.tree.leaves(nnx.state(grads))):
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mesh_sizes", [{"data": 2, "tensor": 2}, {"context": 4}])
def test_pallas_gdn_layer_on_a_mesh_matches_the_pure_jax_layer(mesh_sizes):
    """The layer on 4 devices with gdn_impl pallas (interpreted; in shard_map over rows and heads, or the
    context path's) == the pure-JAX layer on one device: output and the gradients of the input and every
    weight, packed rows."""
    config = preset("tiny", gdn_chunk_size=16)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 128, config.hidden_size)), jnp.float32)
    segments = jnp.asarray(np.stack([np.repeat([1, 2, 3], [32, 50, 46]), np.ones(128)]), jnp.int32)
    mesh = make_mesh(mesh_sizes, jax.devices()[:4])  # context: 32 tokens, two chunks, per shard

    def run(impl, on_mesh):
        layer = GatedDeltaNet(config.replace(gdn_impl=impl), dtype=jnp.float32, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0))  # the same seed: the same weights for both impls
        return out_and_grads(layer, lambda layer, x: layer(x, segments)[0], x, mesh if on_mesh else None)

    on_mesh = run("pallas", on_mesh=True)
    assert on_mesh[2]  # the kernels ran in shard_map
    assert_same_layer(run("jax", on_mesh=False), on_mesh, min_grads=8)


def test_decode_step_kernel_steps_one_group_of_the_stacked_states():
    """The step kernel (interpreted) on stacked states [G, B, H, dk, dv] and a group index: production heads
    (dv = 128 in two value blocks of 64); o and the group's new state equal XLA's step, the other groups are
    left as they were."""
    *sequence, state = make_inputs(5)
    q, k = (l2_normalise(x[:, 0]) for x in sequence[:2])
    q = q * D**-0.5
    v, g, beta = (x[:, 0] for x in sequence[2:])
    states = jnp.stack([state, 2 * state, -state])
    o, new_states = jax.jit(functools.partial(pallas_delta_rule_step, interpret=True))(
        q, k, v, g, beta, states, jnp.int32(1))
    expected_o, expected_state = delta_rule_step(q, k, v, g, beta, states[1])
    assert relative_error(o, expected_o) < 1e-6
    assert relative_error(new_states[1], expected_state) < 1e-6
    np.testing.assert_array_equal(new_states[::2], states[::2])


def test_generation_with_pallas_gdn_matches_pure_jax():
    """Greedy decoding with gdn_impl pallas (the step kernel, interpreted; also in shard_map on a 2 x 2 mesh)
    == with the pure-JAX layer on one device, with two scanned groups and a tail layer."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    models = [Qwen35ForCausalLM(preset("tiny", num_hidden_layers=10, gdn_impl=impl), rngs=nnx.Rngs(0))
              for impl in ("jax", "pallas")]
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    graphdef, state = nnx.split(models[1])
    params = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(params, param_shardings(params, mesh, DEFAULT_RULES)))
    expected = generate(models[0], prompts, max_new_tokens=6)
    for out in (generate(models[1], prompts, max_new_tokens=6),
                generate(nnx.merge(graphdef, state), prompts, max_new_tokens=6, mesh=mesh)):
        np.testing.assert_array_equal(out.tokens, expected.tokens)
        np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5)


def test_decode_step_runs_on_the_whole_stacked_state_and_lowers_to_triton():
    """A cached one-token call of a model with two scanned groups and a two-layer tail, gdn_impl pallas: every
    GDN layer's step kernel takes the whole stacked state (its group's rows of [G, B*H, dk, dv], or the tail
    layer's [1, B*H, dk, dv]) and aliases it to its output; the kernel lowers for CUDA to one Triton call."""
    model = Qwen35ForCausalLM(preset("tiny", num_hidden_layers=10, gdn_impl="pallas"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(2, 8)
    jaxpr = jax.make_jaxpr(lambda params, ids, cache: nnx.merge(graphdef, params)(ids, cache=cache).cache)(
        params, jnp.zeros((2, 1), jnp.int32), cache)
    steps = [eqn for eqn in all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"
             and "gdr_decode_step" in str(eqn.params.get("name_and_src_info", eqn.params.get("name")))]
    groups, batch, heads, key_dim, value_dim = cache.groups[0]["state"].shape
    assert sorted(eqn.invars[6].aval.shape[0] for eqn in steps) == [1, 1, groups, groups, groups]
    assert all(eqn.invars[6].aval.shape[1:] == (batch * heads, key_dim, value_dim) for eqn in steps)
    assert all(tuple(eqn.params["input_output_aliases"]) == ((6, 1),) for eqn in steps)

    token = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in [(batch, heads, key_dim)] * 3 + [(batch, heads)] * 2]
    stacked = jax.ShapeDtypeStruct((groups, batch, heads, key_dim, value_dim), jnp.float32)
    text = jax.jit(pallas_delta_rule_step).trace(*token, stacked, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and 'name = "gdr_decode_step"' in text
