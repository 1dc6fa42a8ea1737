"""RL on a tiny MoE policy: rollouts keep the sampler's routing across turns, and the learner's
forwards replay it, so its logprobs stay the sampler's even where its own router would now pick
other experts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION
from qwen_jax.data.tokenizer import eos_id, load_or_train_tokenizer, pad_id
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.rl.envs import EnvPool
from qwen_jax.rl.learner import Learner, make_learner
from qwen_jax.rl.loop import RLConfig, rollout_step
from qwen_jax.rl.rollout import expert_id_dtype, play_episodes
from qwen_jax.train.step import new_state, state_shardings_for

# One GDN and one attention layer, both MoE (8 experts, top-2).
CONFIG = preset("tiny-moe", vocab_size=300, num_hidden_layers=2,
                layer_types=(LINEAR_ATTENTION, FULL_ATTENTION))
RL = RLConfig(groups=2, group_size=4, max_new_tokens=5, max_turns=2, max_length=32, minibatches=2,
              warmup_steps=0)


class TwoTurnEnv:
    """Every episode has two turns: the env answers the first response with its prompt again (as
    wide as the first, so one compiled `generate` serves both turns)."""

    def reset(self, seed):
        self.prompt, self.turn = f"count {seed} then", 0
        return self.prompt, {}

    def step(self, action):
        self.turn += 1
        if self.turn == 1:
            return self.prompt, 0.0, False, {}
        return "", float(len(action)), True, {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(policy, its params as the RL loop holds them, tokenizer, learner, 8 two-turn episodes)."""
    tokenizer = load_or_train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                                        [f"count {i} then" for i in range(100)], 300)
    model = Qwen35ForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params, optimizer = nnx.to_pure_dict(state), optax.adam(1e-3)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    learner = make_learner(graphdef, optimizer, RL.loss, RL.temperature, mesh, DEFAULT_RULES,
                           state_shardings_for(params, optimizer, mesh, DEFAULT_RULES))
    with EnvPool(TwoTurnEnv, 8) as pool:
        episodes = play_episodes(model, tokenizer, pool, list(range(8)),
                                 max_new_tokens=RL.max_new_tokens, max_turns=RL.max_turns,
                                 max_length=RL.max_length, temperature=RL.temperature,
                                 sample_seed=3, stop_ids=[eos_id(tokenizer)],
                                 pad_id=pad_id(tokenizer))
    return model, params, tokenizer, learner, episodes


@nnx.jit
def free_routing(model, tokens, segment_ids):
    """The experts the model's own router picks: [N, S] -> [N, L, S, k]."""
    return jnp.swapaxes(model(tokens, segment_ids=segment_ids).routing, 0, 1)


def mean_mismatch(logprobs, episodes) -> float:
    """Mean |trainer - sampler| logprob over the sampled tokens (actor/logprob_mismatch)."""
    mask = episodes.loss_mask
    gap = np.abs(np.asarray(logprobs) - episodes.sampler_logprobs)
    return float(np.sum(gap * mask) / mask.sum())


def agreement(routing, episodes) -> float:
    """Fraction of (token, layer) pairs on the episodes' real tokens routed as the sampler did."""
    same = np.all(np.asarray(routing) == episodes.routing, axis=-1)  # [N, L, S]
    real = np.broadcast_to(episodes.segment_ids[:, None] > 0, same.shape)
    return float(same[real].mean())


def test_rollout_keeps_the_sampler_routing_of_every_turn(setup):
    model, params, _, learner, episodes = setup
    assert episodes.routing.shape == (8, 2, RL.max_length, 2)
    assert episodes.routing.dtype == np.int8  # 8 experts; 512 would need int16
    assert expert_id_dtype(128) == np.int8 and expert_id_dtype(129) == np.int16
    # Two sampled spans per episode, the env's reply between them: the multi-turn continuation.
    for mask in episodes.loss_mask:
        assert np.count_nonzero(np.diff(mask) == 1) == 2
    # Same params, so the trainer's router picks what the sampler's did on every real token,
    # prompts and replies (prefilled) and sampled tokens (decoded) alike: the routing lines up.
    assert agreement(free_routing(model, episodes.tokens, episodes.segment_ids), episodes) >= 0.99
    replayed = learner.score(params, episodes.tokens, episodes.segment_ids, episodes.routing)
    assert mean_mismatch(replayed, episodes) < 1e-5


def test_replay_keeps_the_sampler_experts_after_the_router_moves(setup):
    _, params, _, learner, episodes = setup
    # Nudge every router: with free routing, many tokens now go to other experts (measured: 29%
    # of the (token, layer) pairs).
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.003 * jax.random.normal(jax.random.key(1), x.shape)
        if jax.tree_util.keystr(path).endswith("['mlp']['gate']['kernel']") else x, params)
    moved_model = nnx.merge(learner.graphdef, moved)
    assert agreement(free_routing(moved_model, episodes.tokens, episodes.segment_ids),
                     episodes) < 0.9
    replayed = learner.score(moved, episodes.tokens, episodes.segment_ids, episodes.routing)
    free = learner.score(moved, episodes.tokens, episodes.segment_ids)
    # Replay keeps the sampler's experts (only their weights move), so the trainer stays far closer
    # to the sampler than with its own new choices (measured: 6.5e-4 against 1.2e-2).
    assert mean_mismatch(replayed, episodes) < mean_mismatch(free, episodes) / 5


@pytest.mark.slow
def test_rollout_step_replays_in_scoring_and_updates_and_can_be_turned_off(setup):
    _, params, tokenizer, learner, _ = setup
    state = new_state(params, optax.adam(1e-3), 0)
    for replay in (True, False):
        seen = []

        def score(params, tokens, segment_ids, routing=None):
            seen.append(("score", routing))
            return learner.score(params, tokens, segment_ids, routing)

        def update(state, batch):
            seen.append(("update", batch.get("routing")))
            # The real update (routing included) once; a stand-in when only the arguments matter.
            return learner.update(state, batch) if replay else (state, {})

        spy = Learner(learner.graphdef, score, update, learner.mesh, learner.rules)
        rl = dataclasses.replace(RL, routing_replay=replay)
        with EnvPool(TwoTurnEnv, 8) as pool:
            state, row = rollout_step(state, spy, None, tokenizer, pool, rl, step=0, seed=0)
        assert [name for name, _ in seen] == ["score", "update", "update"]
        if replay:
            assert seen[0][1].shape == (8, 2, RL.max_length, 2)
            # Each minibatch carries its own episodes' routing: the halves of the scored batch.
            halves = np.concatenate([seen[1][1], seen[2][1]])
            assert (sorted(row.tobytes() for row in halves)
                    == sorted(row.tobytes() for row in seen[0][1]))
            assert row["actor/logprob_mismatch"] < 1e-5 and np.isfinite(row["actor/pg_loss"])
        else:
            assert all(routing is None for _, routing in seen)
