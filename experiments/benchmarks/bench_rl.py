"""RL throughput: environment steps/s of the EnvPool (arithmetic, thread mode) and of the vmapped
pure-JAX environment at 1K, 10K and 100K environments, and the step-time split (rollout / reward /
update) of the default RL loop (configs/rl_tiny.py, a few steps).

    python experiments/benchmarks/bench_rl.py [--rl-steps 6] [--out experiments/results]

Pool: one reset and one step of every slot with a correct answer; steps/s is slots over the wall
time of the step call (the pool's own perf/env_steps_per_sec). JAX env: ReverseTokensEnv (8 tokens)
batch_reset + batch_step jitted, median of 5 after a compile call. Writes rl_<device>.json / .md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from common import REPO, git_commit, guarded, write_report
from qwen_jax.experiment import load_config
from qwen_jax.rl.envs import EnvPool, ReverseTokensEnv
from qwen_jax.rl.loop import run_rl

COUNTS = (1_000, 10_000, 100_000)
TIMINGS = ("timing_s/rollout", "timing_s/reward", "timing_s/update", "perf/step_time_s")


def pool_steps_per_s(count: int) -> dict:
    with EnvPool("arithmetic", count, timeout_s=60.0) as pool:
        started = time.perf_counter()
        resets = pool.reset(list(range(count)))
        reset_s = time.perf_counter() - started
        answers = {slot: str(result.info["expected"]) for slot, result in enumerate(resets)}
        started = time.perf_counter()
        results = pool.step(answers)
        step_s = time.perf_counter() - started
    assert all(result.reward == 1.0 for result in results.values())
    return {"envs": count, "reset_s": reset_s, "step_s": step_s, "steps_per_s": count / step_s}


def jax_env_steps_per_s(count: int) -> dict:
    env = ReverseTokensEnv(tuple(range(10, 20)), 8)
    keys = jax.random.split(jax.random.key(0), count)

    def one_round():
        states, obs = env.batch_reset(keys)
        _, _, reward, _ = env.batch_step(states, obs[:, ::-1])
        return jax.block_until_ready(reward)

    assert float(np.mean(one_round())) == 1.0  # compile, and the reversal scores 1
    times = []
    for _ in range(5):
        started = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - started)
    return {"envs": count, "round_s": statistics.median(times),
            "steps_per_s": count / statistics.median(times)}


def loop_split(steps: int) -> dict:
    """Median per-step timings of a short default RL run (after its first, compiling, step)."""
    config = load_config(REPO / "configs" / "rl_tiny.py",
                         ["wandb.mode=disabled", f"rl.steps={steps}", f"rl.eval_every={steps}"])
    with tempfile.TemporaryDirectory() as workdir:
        rows = run_rl(config, workdir)
    return {key: statistics.median(row[key] for row in rows[1:]) for key in TIMINGS} | {
        "steps": steps, "episodes_per_step": config.rl.groups * config.rl.group_size}


def markdown(data: dict) -> str:
    lines = [f"# RL throughput ({data['device']}, {data['date']})", "",
             "| environments | EnvPool steps/s (thread) | vmapped JAX env steps/s |",
             "|---|---|---|"]
    for pool, vmapped in zip(data["pool"], data["jax_env"]):
        cells = [f"{row['steps_per_s']:,.0f}" if "steps_per_s" in row else
                 f"error: {row.get('error', '')[:60]}" for row in (pool, vmapped)]
        lines.append(f"| {pool.get('envs', '?'):,} | {cells[0]} | {cells[1]} |")
    split = data["loop"]
    if "error" in split:
        lines += ["", f"RL loop: error {split['error'][:100]}"]
    else:
        lines += ["", f"configs/rl_tiny.py, {split['episodes_per_step']} episodes a step, median "
                  f"of steps 2..{split['steps']}:", "", "| rollout s | reward s | update s | step s |",
                  "|---|---|---|---|",
                  "| " + " | ".join(f"{split[key]:.3f}" for key in TIMINGS) + " |"]
    lines += ["", f"jax {data['jax']}, commit {data['commit']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rl-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    args = parser.parse_args()
    data = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
            "jax": jax.__version__, "commit": git_commit(),
            "pool": [{"envs": n, **guarded(f"pool {n}", lambda: pool_steps_per_s(n))} for n in COUNTS],
            "jax_env": [{"envs": n, **guarded(f"jax {n}", lambda: jax_env_steps_per_s(n))}
                        for n in COUNTS],
            "loop": guarded("loop", lambda: loop_split(args.rl_steps))}
    print(write_report(args.out, f"rl_{jax.devices()[0].platform}", data, markdown))


if __name__ == "__main__":
    main()
