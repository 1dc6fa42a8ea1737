"""The sharded train step: same result on every mesh as on one device; non-finite steps skipped."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_jax.config import ConfigError, TrainConfig, preset
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.train.step import make_trainer

MODEL = preset("tiny", vocab_size=256, num_hidden_layers=4)
# eps large enough that Adam's update follows the gradient's size, so fp32 reduction-order noise
# in near-zero gradients stays noise instead of flipping a whole lr-sized step.
TRAIN = TrainConfig(batch_size=8, seq_len=64, lr=1e-2, warmup_steps=0, schedule="constant",
                    eps=1e-3, grad_accum=2)


def make_batch(seed=0):
    ids = np.random.default_rng(seed).integers(0, MODEL.vocab_size, (8, 65)).astype(np.int32)
    segments = np.where(np.arange(64) < 40, 1, 2).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "segment_ids": np.broadcast_to(segments, (8, 64)).copy(),
            "loss_mask": np.ones((8, 64), np.float32)}


def run_two_steps(trainer, state):
    losses = []
    for seed in (0, 1):
        state, metrics = trainer.step_fn(state, trainer.global_batch(make_batch(seed)))
        losses.append(float(metrics["learning/loss"]))
    return state, losses


@pytest.fixture(scope="module")
def single_device():
    """The one-device trainer (its step compiled once, for every test here), its initial state
    (host copies) and the params and losses after two steps from it."""
    trainer = make_trainer(MODEL, TRAIN, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    initial = jax.tree.map(np.asarray, trainer.init_state(seed=0))
    state, losses = run_two_steps(trainer, jax.device_put(initial, trainer.state_shardings))
    return trainer, initial, jax.tree.map(np.asarray, state["params"]), losses


@pytest.mark.parametrize("mesh_sizes, sharded_axes, init_on_mesh", [
    ({"data": 8}, set(), False),
    ({"fsdp": 8}, {"fsdp"}, False),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp", "tensor"}, True),
])
def test_mesh_matches_single_device(single_device, mesh_sizes, sharded_axes, init_on_mesh, capfd):
    _, initial, params_1, losses_1 = single_device
    trainer = make_trainer(MODEL, TRAIN, make_mesh(mesh_sizes), DEFAULT_RULES)
    if init_on_mesh:  # the random init, sharded over fsdp and tensor, gives one device's params
        state = trainer.init_state(seed=0)
        for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(initial["params"])):
            np.testing.assert_array_equal(np.asarray(got), want)
    else:  # the same initial state, placed by the trainer's shardings (no init program to compile)
        state = jax.device_put(initial, trainer.state_shardings)
    state, losses = run_two_steps(trainer, state)
    # No tensor is replicated whole to change its layout (XLA warns on stderr when it must).
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    # atol: each device sums the cross-entropy of its own tokens, so fp32 sums run in another order
    # than on one device (seen: 2 of 32K entries off by 1.9e-6 after two steps).
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params_1)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=5e-6)
    # The MLP kernel [layers, embed, mlp] and its Adam moment really are split over the mesh.
    kernel = state["params"]["groups"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    moment = state["opt_state"][1][0].mu["groups"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    for array in (kernel, moment):
        used = {axis for entry in array.sharding.spec if entry for axis in
                ((entry,) if isinstance(entry, str) else entry)}
        assert used == sharded_axes
        if sharded_axes:
            assert array.addressable_shards[0].data.size < array.size


def test_non_finite_gradients_are_skipped_and_counted(single_device):
    trainer, initial, _, _ = single_device
    state = jax.device_put(initial, trainer.state_shardings)
    before = initial["params"]
    bad = make_batch()
    bad["loss_mask"][0, 0] = np.nan  # poisons the loss and every gradient
    state, metrics = trainer.step_fn(state, trainer.global_batch(bad))
    assert int(metrics["learning/skipped_steps"]) == 1 and int(state["bad_streak"]) == 1
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(got), want)
    state, metrics = trainer.step_fn(state, trainer.global_batch(make_batch()))
    assert int(metrics["learning/skipped_steps"]) == 1 and int(state["bad_streak"]) == 0
    assert np.isfinite(float(metrics["learning/loss"]))


def test_bf16_optimizer_state_halves_the_moments_and_follows_float32_training(single_device):
    _, initial, params_1, losses_1 = single_device
    # On an fsdp mesh: the moments and their rounding key must shard like any optimizer state.
    trainer = make_trainer(MODEL, dataclasses.replace(TRAIN, opt_state_dtype="bfloat16"), make_mesh({"fsdp": 8}),
                           DEFAULT_RULES)
    abstract = jax.eval_shape(lambda: trainer.init_state(seed=0))["opt_state"]
    float32_moments = [x for x in jax.tree.leaves(initial["opt_state"]) if np.issubdtype(x.dtype, np.floating)]
    moments = [x for x in jax.tree.leaves(abstract) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    assert sum(x.size * x.dtype.itemsize for x in moments) * 2 == sum(x.nbytes for x in float32_moments)
    # The same initial params, with the bf16 optimizer's own (zero) state.
    state = jax.device_put({**initial, "opt_state": trainer.optimizer.init(initial["params"])},
                           trainer.state_shardings)
    state, losses = run_two_steps(trainer, state)
    # bf16 moments, int32 step counts and the uint32 key of their stochastic rounding.
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"])} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32),
                                                                      jnp.dtype(jnp.uint32)}
    np.testing.assert_allclose(losses, losses_1, rtol=1e-3)
    # Rounded moments move each step by at most a few bf16 ulps of Adam's lr-sized update, but they do move it.
    differences = [np.max(np.abs(np.asarray(got) - want))
                   for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params_1))]
    assert 0 < max(differences) < 5e-4, max(differences)
    moment = optax.tree_utils.tree_get(state["opt_state"], "mu")["groups"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert moment.dtype == jnp.bfloat16 and moment.addressable_shards[0].data.size < moment.size


@pytest.mark.parametrize("changes, field", [
    (dict(batch_size=6, grad_accum=4), "train.batch_size"),
    (dict(lr=0.0), "train.lr"),
    (dict(schedule="linear"), "train.schedule"),
    (dict(opt_state_dtype="float16"), "train.opt_state_dtype"),
])
def test_bad_train_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig(**changes)


def test_mesh_mismatch_names_the_axes():
    with pytest.raises(ConfigError, match="data=3"):
        make_mesh({"data": 3, "fsdp": 1})
    with pytest.raises(ConfigError, match="mesh.fsdp=-1"):
        make_mesh({"data": 3, "fsdp": -1})
