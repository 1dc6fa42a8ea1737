"""Profiling a run: the traced steps, and the summary of where their time went."""

import json

import jax
import pytest

from qwen_jax.experiment import load_config
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics
from qwen_jax.train.profiling import StepProfiler, op_events, self_times, summarize

SMALL = ["wandb.mode=disabled", "train.steps=4", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1",
         "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "train.eval_every=1000",
         "train.eval_batches=1", "train.profile_start=2", "train.profile_steps=2"]


def test_a_profiled_run_says_where_its_step_time_went(tmp_path):
    rows = run_training(load_config("configs/pretrain_tiny.py", SMALL), tmp_path)
    steps = [1, 2, 3, 4]
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == steps == [r["step"] for r in rows]
    assert list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert (summary["steps"], summary["devices"], summary["events"]) == (2, 8, "host")
    assert summary["module"].startswith("jit_") and summary["module_in_trace"]
    parts = {row["part"]: row["ms_per_step"] for row in summary["by_part"]}
    # Every layer kind of the tiny model shows up under its own module file, and most time has a source.
    for part in ("model/gated_deltanet.py", "model/attention.py", "model/mlp.py", "ops/cross_entropy.py"):
        assert parts.get(part, 0) > 0, (part, parts)
    assert parts.get("(no source)", 0) < 0.25 * summary["op_ms_per_step"], parts
    assert abs(sum(parts.values()) - summary["op_ms_per_step"]) < 1e-6 * summary["op_ms_per_step"]
    times = [row["ms_per_step"] for row in summary["top_ops"]]
    assert times == sorted(times, reverse=True) and len(times) == 30
    assert sum(row["source"] != "-" for row in summary["top_ops"]) >= 15, summary["top_ops"]
    assert "## By model part" in (tmp_path / "profile" / "summary.md").read_text()


def _event(pid, tid, name, ts, dur, module="jit_step"):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
            "args": {"hlo_op": name, "hlo_module": module}}


def test_self_times_take_out_nested_ops_and_the_device_tracks_win():
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        _event(1, 1, "host_op", 0, 500),
        _event(2, 7, "while.1", 0, 100), _event(2, 7, "dot.2", 10, 30), _event(2, 7, "copy.3", 50, 10),
        _event(2, 8, "dot.2", 0, 40),  # another stream
        _event(2, 7, "fusion.4", 100, 20, module="jit_other"),
    ]
    where, ops = op_events(events)
    assert where == "device" and {e["name"] for e in ops} == {"while.1", "dot.2", "copy.3", "fusion.4"}
    assert sorted((e["name"], t) for e, t in self_times(ops)) == [
        ("copy.3", 10), ("dot.2", 30), ("dot.2", 40), ("fusion.4", 20), ("while.1", 60)]
    summary = summarize(events, steps=2)
    assert summary["op_ms_per_step"] == pytest.approx(160 / 1e3 / 2)
    assert [(row["op"], row["ms_per_step"], row["calls_per_step"]) for row in summary["top_ops"]] == [
        ("dot.2", 0.035, 1.0), ("while.1", 0.03, 0.5), ("fusion.4", 0.01, 0.5), ("copy.3", 0.005, 0.5)]
    # Without the step's program, every op is some other program's.
    assert {row["part"] for row in summary["by_part"]} == {"(other programs)"}


def test_a_trace_that_cannot_start_leaves_the_steps_untraced(tmp_path):
    jax.profiler.start_trace(str(tmp_path / "another"))  # only one trace may run at a time
    try:
        profiler = StepProfiler(tmp_path / "profile", 1, 2, lambda: None)
        with pytest.warns(UserWarning, match="could not start the trace"):
            profiler.before_step(1)
        assert profiler.after_step(1, 0.1) is None and profiler.after_step(2, 0.1) is None
        assert profiler.stop() is None and not (tmp_path / "profile" / "summary.json").exists()
    finally:
        jax.profiler.stop_trace()
