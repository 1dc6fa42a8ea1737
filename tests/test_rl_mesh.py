"""RL on a mesh: one RL step with the sampler and learner sharded over 8 devices (data x fsdp x
tensor; for a MoE policy data x expert x tensor, routing replayed) gives the one-device step's
episodes, losses and params, and the state stays sharded."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION
from qwen_jax.data.tokenizer import load_or_train_tokenizer
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.rl.envs import EnvPool
from qwen_jax.rl.learner import make_learner
from qwen_jax.rl.loop import RLConfig, rollout_step
from qwen_jax.train.step import new_state, state_shardings_for

LAYERS = dict(vocab_size=300, num_hidden_layers=2, layer_types=(LINEAR_ATTENTION, FULL_ATTENTION))
# Each policy with its mesh and the mesh axes its weights are split over.
CASES = {"dense": (preset("tiny", **LAYERS), {"data": 2, "fsdp": 2, "tensor": 2}, ("fsdp", "tensor")),
         "moe": (preset("tiny-moe", **LAYERS), {"data": 2, "expert": 2, "tensor": 2}, ("expert", "tensor"))}
# 16 episodes, two minibatches of 8 rows: each divides over data x fsdp = 4.
RL = RLConfig(groups=2, group_size=8, max_new_tokens=6, max_length=24, minibatches=2,
              warmup_steps=0)
# SGD, not Adam: Adam's first steps move every weight by about lr whatever its gradient's size, so
# a near-zero gradient's rounding (sharded sums add in another order) would flip whole steps.
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


class LengthEnv:
    """One turn; the reward is the answer's length mod 3, so a group's rewards differ."""

    def reset(self, seed):
        return f"say {seed} now", {}

    def step(self, action):
        return "", float(len(action) % 3), True, {}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_or_train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                                   [f"say {i} now" for i in range(100)], 300)


def step_on(mesh, graphdef, params, tokenizer):
    """One rollout_step on `mesh` -> (new state, metrics row)."""
    shardings = state_shardings_for(params, OPTIMIZER, mesh, DEFAULT_RULES)
    learner = make_learner(graphdef, OPTIMIZER, RL.loss, RL.temperature, mesh, DEFAULT_RULES,
                           shardings)
    state = jax.jit(lambda p: new_state(p, OPTIMIZER, 0), out_shardings=shardings)(params)
    with EnvPool(LengthEnv, RL.groups * RL.group_size) as pool:
        return rollout_step(state, learner, None, tokenizer, pool, RL, step=0, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_rl_step_on_a_mesh_equals_one_device(tokenizer, case):
    config, mesh_sizes, split_over = CASES[case]
    graphdef, state = nnx.split(Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    single, single_row = step_on(make_mesh({"data": 1}, jax.devices()[:1]), graphdef, params, tokenizer)
    sharded, sharded_row = step_on(make_mesh(mesh_sizes), graphdef, params, tokenizer)

    # The same episodes were sampled and rewarded, and both learners moved the params.
    for key in ("rewards/mean", "rewards/std", "response_length/mean"):
        assert sharded_row[key] == single_row[key], key
    assert single_row["rewards/std"] > 0
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm"):
        np.testing.assert_allclose(sharded_row[key], single_row[key], rtol=1e-4, err_msg=key)
    assert sharded_row["actor/logprob_mismatch"] < 1e-5
    moved = False
    for got, want, start in zip(*(jax.tree.leaves(s["params"]) for s in (sharded, single)),
                                jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
        moved |= bool(np.any(np.asarray(want) != np.asarray(start)))
    assert moved

    # The sharded state really is split over both of the case's weight axes.
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded["params"])]
    assert any(all(axis in spec for axis in split_over) for spec in specs)
    for got, param in zip(jax.tree.leaves(sharded["opt_state"]),
                          jax.tree.leaves(sharded["params"])):  # momentum follows its param
        assert got.sharding == param.sharding
