"""MoE dispatch (padded == ragged == a per-assignment loop), expert parallelism over the mesh, and
routing replay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import TrainConfig
from qwen_jax.ops.grouped_matmul import expert_capacity, expert_ffn
from qwen_jax.parallel.expert import expert_parallel_ffn
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding
from qwen_jax.train.step import loss_fn, make_trainer

NUM_EXPERTS, TOP_K, HIDDEN, WIDTH, TOKENS = 8, 2, 16, 12, 64


def expert_weights(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (0.3 * jax.random.normal(k1, (NUM_EXPERTS, HIDDEN, 2 * WIDTH)),
            0.3 * jax.random.normal(k2, (NUM_EXPERTS, WIDTH, HIDDEN)))


def routing(kind: str) -> np.ndarray:
    """[TOKENS, TOP_K] distinct experts per token: random, or every token to experts 0 and 1."""
    if kind == "all_to_one":
        return np.tile(np.arange(TOP_K, dtype=np.int32), (TOKENS, 1))
    rng = np.random.default_rng(1)
    return np.stack([rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(TOKENS)]).astype(np.int32)


def per_assignment_loop(x, experts, gate_up, down):
    """The definition: SwiGLU of expert e on token t, one assignment at a time."""
    out = []
    for t, e in zip(np.repeat(np.arange(TOKENS), TOP_K), experts.reshape(-1)):
        gate, up = np.split(x[t] @ gate_up[e], 2)
        out.append((gate / (1 + np.exp(-gate)) * up) @ down[e])
    return np.stack(out).reshape(TOKENS, TOP_K, HIDDEN)


def local_ffn(dispatch, capacity_factor=1.25):
    def run(x, experts, gate_up, down):
        out = expert_ffn(x, jnp.arange(TOKENS * TOP_K) // TOP_K, experts.reshape(-1), gate_up, down,
                         dispatch=dispatch,
                         capacity=expert_capacity(TOKENS * TOP_K, NUM_EXPERTS, capacity_factor))
        return out.reshape(TOKENS, TOP_K, HIDDEN)
    return run


COTANGENT = np.random.default_rng(7).standard_normal((TOKENS, TOP_K, HIDDEN)).astype(np.float32)


def values_and_grads(ffn):
    """ffn -> a function of (x, experts, gate_up, down) giving (ffn's output, the gradients of
    <output, COTANGENT> for x, gate_up, down). Both are jitted once: the routing is an argument,
    so every routing reuses the compiled programs."""
    value = jax.jit(ffn)
    loss = lambda x, gate_up, down, experts: jnp.sum(ffn(x, experts, gate_up, down) * COTANGENT)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda x, experts, gate_up, down: (value(x, experts, gate_up, down),
                                              grads(x, gate_up, down, experts))


def on_one_device(ffn):
    """ffn traced under a one-device mesh, where cond_or_select branches even on this CPU."""
    mesh = make_mesh({"data": 1}, jax.devices()[:1])

    def run(*args):
        with activation_sharding(mesh, DEFAULT_RULES):
            return ffn(*args)
    return run


RAGGED = values_and_grads(local_ffn("ragged"))
# On this CPU's 8 devices the overflow pass is selected (XLA:CPU deadlocks on conditionals among
# collectives); on one device it runs under lax.cond, as on accelerators.
PADDED = {"select": values_and_grads(local_ffn("padded")),
          "cond": values_and_grads(on_one_device(local_ffn("padded")))}


def test_the_overflow_pass_branches_unless_on_several_cpu_devices():
    args = (jnp.zeros((TOKENS, HIDDEN)), jnp.asarray(routing("random")), *expert_weights())
    assert "cond[" in str(jax.make_jaxpr(on_one_device(local_ffn("padded")))(*args))
    assert "cond[" not in str(jax.make_jaxpr(local_ffn("padded"))(*args))


@pytest.mark.parametrize("overflow_pass", ["select", "cond"])
@pytest.mark.parametrize("kind", ["random", "all_to_one"])
def test_padded_dispatch_equals_ragged_and_the_definition(kind, overflow_pass):
    x = jax.random.normal(jax.random.key(3), (TOKENS, HIDDEN))
    experts = jnp.asarray(routing(kind))
    gate_up, down = expert_weights()
    reference = per_assignment_loop(*map(np.asarray, (x, experts, gate_up, down)))
    ragged, ragged_grads = RAGGED(x, experts, gate_up, down)
    np.testing.assert_allclose(ragged, reference, rtol=1e-5, atol=1e-5)
    # all_to_one overflows experts 0 and 1 far past capacity: the overflow pass must catch it all.
    padded, padded_grads = PADDED[overflow_pass](x, experts, gate_up, down)
    np.testing.assert_allclose(padded, ragged, rtol=1e-6, atol=1e-6)
    for got, want in zip(padded_grads, ragged_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padded_dispatch_backward_keeps_no_per_block_copies_of_the_expert_weights():
    # Wide experts, few rows: the overflow pass runs 8 blocks of 16 rows. Measured temporaries: 1.3x the
    # weights' bytes; 2.1x when autodiff kept each block's gate_up[e] and down[e] slices. (On TPU, with
    # remat, it cost far more: tests/test_compile_check.py.)
    experts, hidden, width, rows = 4, 256, 512, 64
    weights = (jax.ShapeDtypeStruct((experts, hidden, 2 * width), jnp.float32),
               jax.ShapeDtypeStruct((experts, width, hidden), jnp.float32))

    def loss(gate_up, down, x, expert_index):
        out = expert_ffn(x, jnp.arange(rows), expert_index, gate_up, down, dispatch="padded",
                         capacity=expert_capacity(rows, experts, 1.25))
        return jnp.sum(out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
        *weights, jax.ShapeDtypeStruct((rows, hidden), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.int32)).lower().compile()
    weight_bytes = sum(np.prod(w.shape) * 4 for w in weights)
    assert compiled.memory_analysis().temp_size_in_bytes < 1.75 * weight_bytes


@functools.cache
def parallel_ffn(mesh_items):
    """The expert-parallel FFN on the mesh of these (axis, size) items, compiled once per mesh."""
    mesh = make_mesh(dict(mesh_items))

    def parallel(x, experts, gate_up, down):
        return expert_parallel_ffn(x, experts, gate_up, down, mesh=mesh, dispatch="padded",
                                   capacity_factor=1.25)
    return values_and_grads(parallel)


@pytest.mark.parametrize("kind", ["random", "all_to_one"])
@pytest.mark.parametrize("mesh_sizes", [{"expert": 8}, {"data": 2, "expert": 4}])
def test_expert_parallel_ffn_equals_one_device(kind, mesh_sizes):
    x = jax.random.normal(jax.random.key(3), (TOKENS, HIDDEN))
    experts = jnp.asarray(routing(kind))
    gate_up, down = expert_weights()
    got, got_grads = parallel_ffn(tuple(mesh_sizes.items()))(x, experts, gate_up, down)
    want, want_grads = RAGGED(x, experts, gate_up, down)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


MOE = preset("tiny-moe", vocab_size=256, num_hidden_layers=4)
TRAIN = TrainConfig(batch_size=8, seq_len=32, warmup_steps=0)


def make_batch(seed=0):
    ids = np.random.default_rng(seed).integers(0, MOE.vocab_size, (8, 33)).astype(np.int32)
    segments = np.where(np.arange(32) < 20, 1, 2).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "segment_ids": np.broadcast_to(segments, (8, 32)).copy(),
            "loss_mask": np.ones((8, 32), np.float32)}


def loss_and_grads(mesh_sizes, params, devices=None):
    """(loss, grads, compiled HLO text, params on the mesh) of the MoE model's loss on `mesh_sizes`,
    from the given (host) params, placed by the trainer's shardings."""
    mesh = make_mesh(mesh_sizes, devices)
    trainer = make_trainer(MOE, TRAIN, mesh, DEFAULT_RULES)
    params = jax.device_put(params, trainer.state_shardings["params"])
    batch = trainer.global_batch(make_batch())

    def run(params, batch):
        with activation_sharding(mesh, trainer.rules):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, trainer.graphdef, batch, TRAIN, jnp.sum(batch["loss_mask"]))
        return loss, grads

    step = jax.jit(run, in_shardings=(trainer.state_shardings["params"], trainer.batch_shardings))
    compiled = step.lower(params, batch).compile()
    loss, grads = compiled(params, batch)
    return loss, grads, compiled.as_text(), params


@pytest.fixture(scope="module")
def single_device():
    """One device: the model's initial params (host copies), the loss and its gradients."""
    trainer = make_trainer(MOE, TRAIN, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    params = jax.tree.map(np.asarray, trainer.init_state(seed=0)["params"])
    loss, grads, _, _ = loss_and_grads({"data": 1}, params, jax.devices()[:1])
    return params, float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("mesh_sizes", [{"expert": 8}, {"data": 2, "expert": 4},
                                        {"fsdp": 2, "expert": 4}])
def test_expert_parallel_model_matches_one_device(single_device, mesh_sizes):
    params_1, loss_1, grads_1 = single_device
    loss, grads, hlo, params = loss_and_grads(mesh_sizes, params_1)
    assert float(loss) == pytest.approx(loss_1, rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    assert "all-to-all" in hlo
    experts = params["groups"]["layers"][0]["mlp"]["experts"]
    for weights in (experts["gate_up_proj"], experts["down_proj"]):  # [layers, E, ...]
        assert weights.sharding.spec[1] == "expert"
        assert weights.addressable_shards[0].data.shape[1] == MOE.num_experts // mesh_sizes["expert"]


def test_train_step_reports_expert_load(single_device):
    trainer = make_trainer(MOE, TRAIN, make_mesh({"expert": 8}), DEFAULT_RULES)
    state = trainer.init_state(seed=0)
    # Initialised on the expert mesh (each device its own experts), the params are one device's.
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(single_device[0])):
        np.testing.assert_array_equal(np.asarray(got), want)
    _, metrics = trainer.step_fn(state, trainer.global_batch(make_batch()))
    load = np.asarray(metrics["moe/expert_load"])
    assert load.shape == (MOE.num_hidden_layers, MOE.num_experts)
    np.testing.assert_array_equal(load.sum(1), 8 * 32 * MOE.num_experts_per_tok)
    assert float(metrics["learning/moe_lb_loss"]) > 0


@nnx.jit
def forward(model, ids, routing=None):
    out = model(ids, routing=routing)
    return out.logits, out.routing


def test_routing_replay_reproduces_and_never_reroutes():
    model = Qwen35ForCausalLM(MOE, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, MOE.vocab_size, (2, 48)))
    logits, chosen = forward(model, ids)
    assert chosen.shape == (MOE.num_hidden_layers, 2, 48, MOE.num_experts_per_tok)
    replayed, replayed_routing = forward(model, ids, chosen)
    np.testing.assert_array_equal(replayed_routing, chosen)
    np.testing.assert_allclose(replayed, logits, rtol=1e-6, atol=1e-6)

    # Move every weight a little: free routing changes, replay keeps the recorded experts.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(1)  # NumPy: eager jax.random would compile once per weight shape
    moved = [jnp.asarray(np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32)) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    free_logits, free_routing = forward(model, ids)
    assert np.any(np.asarray(free_routing) != np.asarray(chosen))
    moved_logits, moved_routing = forward(model, ids, chosen)
    np.testing.assert_array_equal(moved_routing, chosen)
    assert not np.allclose(moved_logits, free_logits, atol=1e-5)


def test_replay_with_wrong_shape_is_refused():
    model = Qwen35ForCausalLM(MOE, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="routing shape"):
        model(ids, routing=jnp.zeros((2, 1, 8, 2), jnp.int32))
