"""A run of 4 steps (checkpoints every 2) that must resume from step 2 and repeat itself exactly."""

import shutil

from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics


def assert_resume_from_step_2_repeats_the_run(config, workdir, capsys) -> list[dict]:
    """Train `config` (4 steps), drop checkpoint 4, train again: it must say it resumed from step 2
    and log the same losses bitwise. -> the first run's metrics rows."""
    run_training(config, workdir)
    first = read_metrics(workdir / "metrics.jsonl")
    shutil.rmtree(workdir / "checkpoints" / "4")
    capsys.readouterr()
    run_training(config, workdir)
    assert capsys.readouterr().out.startswith("resumed from step 2\n")
    again = read_metrics(workdir / "metrics.jsonl")
    assert [row["learning/loss"] for row in again] == [row["learning/loss"] for row in first]
    assert again[-1]["eval/loss"] == first[-1]["eval/loss"]
    return first
