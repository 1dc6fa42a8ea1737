"""Profiling a run: the traced steps, and the summary of where their time went."""

import json
import subprocess
import sys

import jax
import pytest

from qwen_jax.train.metrics import read_metrics
from qwen_jax.train.profiling import StepProfiler, op_events, self_times, summarize

SMALL = ["wandb.mode=disabled", "train.steps=4", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1",
         "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "train.eval_every=1000",
         "train.eval_batches=1", "train.profile_start=2", "train.profile_steps=2"]


def test_a_profiled_run_says_where_its_step_time_went(tmp_path):
    # Its own process: jax.profiler crashes one that has imported torch, as the parity tests do.
    subprocess.run([sys.executable, "-m", "qwen_jax.cli", "train", "--config=configs/pretrain_tiny.py",
                    f"--workdir={tmp_path}", *(f"--config.{override}" for override in SMALL)],
                   check=True, capture_output=True)
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
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


def test_gpu_kernels_that_name_no_hlo_op_are_timed_by_kernel_name():
    events = [
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "X", "pid": 2, "tid": 1, "name": "jit_step", "ts": 0, "dur": 100, "args": {}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "gemm_kernel", "ts": 0, "dur": 30, "args": {}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "gemm_kernel", "ts": 40, "dur": 30, "args": {}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "launch", "ts": 0, "dur": 5, "args": {"hlo_op": "fusion.1"}},
    ]
    where, ops = op_events(events)
    assert where == "device kernels" and [e["name"] for e in ops] == ["gemm_kernel", "gemm_kernel"]
    summary = summarize(events, steps=1)
    assert [(row["op"], row["ms_per_step"]) for row in summary["top_ops"]] == [("gemm_kernel", 0.06)]


def test_a_trace_that_cannot_start_leaves_the_steps_untraced(tmp_path, monkeypatch):
    def already_running(log_dir):
        raise RuntimeError("Profile has already been started. Only one profile may be run at a time.")

    monkeypatch.setattr(jax.profiler, "start_trace", already_running)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    profiler = StepProfiler(tmp_path / "profile", 1, 2, lambda: None)
    with pytest.warns(UserWarning, match="could not start the trace"):
        profiler.before_step(1)
    assert profiler.after_step(1, 0.1) is None and profiler.after_step(2, 0.1) is None
    assert profiler.stop() is None and not (tmp_path / "profile" / "summary.json").exists()


def test_a_process_that_imported_torch_is_not_traced(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", sys)  # what matters is the name, not the module
    profiler = StepProfiler(tmp_path / "profile", 1, 1, lambda: None)
    with pytest.warns(UserWarning, match="imported torch"):
        profiler.before_step(1)
    assert not profiler.tracing and profiler.after_step(1, 0.1) is None


def test_a_run_that_never_reaches_the_window_says_so(tmp_path):
    """Resumed past train.profile_start, or ending before it: nothing would be traced, and the run says why."""
    profiler = StepProfiler(tmp_path, 3, 2, lambda: None)
    assert profiler.missed(1, 10) is None
    assert profiler.missed(3, 10) is None
    assert "profile_start is 3, outside the steps this run takes (5..10)" in profiler.missed(5, 10)
    assert "(1..2)" in profiler.missed(1, 2)
    assert StepProfiler(tmp_path, 3, 0, lambda: None).missed(5, 10) is None  # profiling off
