"""The training loop end to end: kill-and-resume, partial checkpoints, bad config, learning."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from qwen_jax.cli import main
from qwen_jax.data import load_or_train_tokenizer, pack_corpus, python_docs_corpus, split_documents
from qwen_jax.data import unigram_entropy
from qwen_jax.experiment import load_config
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import JsonlWriter, read_metrics

SMALL = ["--config.train.batch_size=4", "--config.train.seq_len=64", "--config.train.warmup_steps=5",
         "--config.model.vocab_size=512", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.wandb.mode=disabled",
         "--config.train.eval_every=1000", "--config.train.eval_batches=1"]
STEPS, EVERY = 40, 10
# One CPU device per process keeps these runs quick; bitwise comparisons are between equal setups.
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """ONE_DEVICE plus a compilation cache shared by this module's training processes: they all
    build the same program, so only the first compiles it (the others load the same executable)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(ONE_DEVICE, JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


OVERRIDES = [f"--config.train.steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}", *SMALL]


def train_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "qwen_jax.cli", "train", "--config=configs/pretrain_tiny.py",
            f"--workdir={workdir}", *OVERRIDES]


def final_params(workdir: Path, step: int):
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir.absolute() / "checkpoints" / str(step) / "state")
    return state["params"]


def losses(workdir: Path) -> dict[int, float]:
    return {row["step"]: row["learning/loss"] for row in read_metrics(workdir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_device):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(train_command(workdir), env=one_device, check=True, capture_output=True)
    return workdir


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(uninterrupted, one_device, tmp_path):
    workdir = tmp_path / "killed"
    process = subprocess.Popen(train_command(workdir), env=one_device, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and process.poll() is None:
        steps_done = max(losses(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0
        saved = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] if (workdir / "checkpoints").exists() else []
        if saved and steps_done >= max(saved) + 2:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed_at = steps_done
            break
        time.sleep(0.05)
    assert killed_at is not None and killed_at < STEPS, "the run finished before it could be killed"

    resumed = subprocess.run(train_command(workdir), env=one_device, check=True, capture_output=True,
                             text=True)
    first_line = resumed.stdout.splitlines()[0]
    assert first_line.startswith("resumed from step ")
    assert 0 < int(first_line.split()[-1]) < killed_at
    assert losses(workdir) == losses(uninterrupted)  # bitwise, data order included
    got, want = final_params(workdir, STEPS), final_params(uninterrupted, STEPS)
    for a, b in zip(jax_leaves(got), jax_leaves(want)):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_truncated_checkpoint_is_skipped_with_a_warning(uninterrupted, one_device, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / str(STEPS)
    for data_file in (latest / "state").rglob("d/*"):
        data_file.write_bytes(b"")  # truncated, as if the process died while writing
    partial = workdir / "checkpoints" / f"{STEPS + 10}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    # Poison the copied rows past the older checkpoint: the resumed run must write them afresh.
    metrics = workdir / "metrics.jsonl"
    rows = [{**row, "learning/loss": -1.0} if row["step"] > STEPS - EVERY else row for row in read_metrics(metrics)]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The same one-device setup as the uninterrupted run, so that its losses can be compared bitwise.
    done = subprocess.run(train_command(workdir), env=one_device, check=True, capture_output=True, text=True)
    assert str(partial) in done.stderr and str(latest) in done.stderr
    assert f"resumed from step {STEPS - EVERY}" in done.stdout
    assert [row["step"] for row in read_metrics(metrics)] == list(range(1, STEPS + 1))
    resumed = range(STEPS - EVERY + 1, STEPS + 1)
    assert [losses(workdir)[s] for s in resumed] == [losses(uninterrupted)[s] for s in resumed]


def test_a_metrics_row_cut_off_mid_write_is_not_read_and_resume_drops_it(tmp_path):
    """A kill can leave half a row at the end of metrics.jsonl, and a reader can catch a row mid-write."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "learning/loss": 2.5}\n{"step": 2, "learning/loss": 2.4}\n{"step": 3, "learn')
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    writer = JsonlWriter(path, resume_step=1)
    writer.write({"step": 2, "learning/loss": 2.3})
    writer.close()
    assert read_metrics(path) == [{"step": 1, "learning/loss": 2.5}, {"step": 2, "learning/loss": 2.3}]


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "mesh data=3"),
    ("--config.train.grad_accum=3", "train.batch_size"),
    ("--config.model.num_key_value_heads=3", "model.num_attention_heads"),
    ("--config.train.stepz=3", "train.stepz"),
    ("--config.wandb.mode=loud", "wandb.mode"),
    ("--config.train.profile_steps=-1", "train.profile_steps"),
    ("--config.train.profile_start=0", "train.profile_start"),
])
def test_bad_config_fails_before_compiling_naming_the_field(override, message, tmp_path, capsys):
    started = time.time()
    with pytest.raises(SystemExit) as error:
        main(["train", "--config=configs/pretrain_tiny.py", f"--workdir={tmp_path}", override])
    assert message in str(error.value)
    assert time.time() - started < 30


@pytest.mark.slow
def test_demo_learns_context(tmp_path):
    """The demo's held-out loss ends below the unigram entropy of its held-out text."""
    config = load_config("configs/pretrain_tiny.py", ["wandb.mode=disabled", "train.steps=150",
                                                      "train.eval_every=150"])
    rows = run_training(config, tmp_path)
    _, held_out = split_documents(python_docs_corpus(), seed=0)
    tokenizer = load_or_train_tokenizer(tmp_path / "tokenizer.json", [], 0)
    corpus = pack_corpus(tokenizer, held_out, seq_len=config.train.seq_len)
    entropy = unigram_entropy(corpus.rows["targets"][corpus.rows["loss_mask"] > 0])
    assert rows[-1]["eval/loss"] < entropy - 0.3, (rows[-1]["eval/loss"], entropy)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 128


def test_consecutive_bad_steps_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    import dataclasses

    import qwen_jax.train.loop as loop
    from qwen_jax.train.loop import TrainingError

    real_make_trainer = loop.make_trainer

    def always_bad(*args, **kwargs):
        trainer = real_make_trainer(*args, **kwargs)

        def step(state, batch):
            state, metrics = trainer.step_fn(state, batch)
            return state, {**metrics, "learning/bad_streak": state["step"]}  # every step "bad"
        return dataclasses.replace(trainer, step_fn=step)

    monkeypatch.setattr(loop, "make_trainer", always_bad)
    config = load_config("configs/pretrain_tiny.py",
                         [a[len("--config."):] for a in OVERRIDES] + ["train.max_bad_steps=2"])
    with pytest.raises(TrainingError, match=r"stopping at step 2: 2 consecutive.*max_bad_steps=2"):
        run_training(config, tmp_path)


@pytest.mark.slow
def test_init_from_a_checkpoint_starts_from_its_params(uninterrupted, tmp_path):
    """Params come from the checkpoint (fresh optimizer): the first loss is the trained model's, not 8.3."""
    overrides = [a[len("--config."):] for a in OVERRIDES] + [
        f"init_from={uninterrupted / 'checkpoints' / str(STEPS)}", "train.steps=1"]
    rows = run_training(load_config("configs/pretrain_tiny.py", overrides), tmp_path)
    trained, fresh = losses(uninterrupted)[STEPS], losses(uninterrupted)[1]
    assert abs(rows[0]["learning/loss"] - trained) < abs(rows[0]["learning/loss"] - fresh)
