"""The RL loop end to end: a tiny policy's reward rises, the sampler agrees with the trainer, and a
resumed run repeats an uninterrupted one exactly."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qwen_jax.experiment import load_config
from qwen_jax.rl.loop import run_rl
from qwen_jax.train.metrics import read_metrics

SMALL = ["wandb.mode=disabled", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2", "rl.groups=4", "rl.group_size=4", "rl.max_length=24",
         "rl.warmup_steps=5", "rl.eval_prompts=8", "rl.eval_every=100"]


def params_at(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir.absolute() / "checkpoints" / str(step) / "state")
    return state["params"]


@pytest.mark.slow
def test_resumed_rl_run_repeats_the_uninterrupted_one(tmp_path):
    whole = run_rl(load_config("configs/rl_tiny.py", [*SMALL, "rl.steps=4",
                                                      "checkpoint.every_steps=2"]), tmp_path / "a")
    run_rl(load_config("configs/rl_tiny.py", [*SMALL, "rl.steps=2"]), tmp_path / "b")
    resumed = run_rl(load_config("configs/rl_tiny.py", [*SMALL, "rl.steps=4",
                                                        "checkpoint.every_steps=2"]), tmp_path / "b")
    assert [row["step"] for row in resumed] == [3, 4]
    assert [row["rewards/mean"] for row in whole[2:]] == [row["rewards/mean"] for row in resumed]
    assert [row["actor/pg_loss"] for row in whole[2:]] == [row["actor/pg_loss"] for row in resumed]
    whole_params, resumed_params = (params_at(tmp_path / run, 4) for run in "ab")
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(resumed_params)):
        np.testing.assert_array_equal(a, b)
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:  # the sampler scores its tokens as the trainer does
        assert row["actor/logprob_mismatch"] < 1e-4
        assert row["env/failed"] == 0
    assert (tmp_path / "b" / "reward.png").exists()


def test_reward_rises_on_a_small_arithmetic_task(tmp_path):
    """Seeded: additions of 0 and 1 (4 problems), a short warm-up, GRPO; the mean reward of the
    last four steps is above the first four's by at least 0.1 (measured: 0.45 -> 0.67)."""
    config = load_config("configs/rl_tiny.py", [
        *SMALL, "rl.env_kwargs.max_operand=1", "rl.warmup_steps=40", "rl.lr=1e-3",
        "rl.group_size=16", "rl.steps=12", "rl.max_new_tokens=3"])
    rewards = [row["rewards/mean"] for row in run_rl(config, tmp_path)]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.1, rewards
