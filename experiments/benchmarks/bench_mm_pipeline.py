"""The image/video-text pipeline's throughput with 0 (in-process), 1 and 2 Grain workers, beside
the tokens/s the train step consumes, for configs/pretrain_mm_tiny.py (text, digits and photos,
clips of moving digits and camera moves).

    python experiments/benchmarks/bench_mm_pipeline.py [--batches 40] [--out experiments/results]

Pipeline: batches of the run's global batch (8 rows x 256 tokens, up to 256 patches a row), timed
after the first batch (which, with workers, includes starting them: reported as startup_s).
Tokens are row slots (B x T); images and videos are real ones in those rows. Train step: the same batches
through the jitted step on one CPU device and on the 8 fake devices `qwen-jax train` uses here,
median of the timed steps after one compile-and-run step. Writes mm_pipeline_<device>.json and .md.
"""

from __future__ import annotations

import os

# 8 host devices like the test suite, set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402

from common import REPO, git_commit, guarded, write_report  # noqa: E402
from qwen_jax.experiment import load_config, model_config, train_config  # noqa: E402
from qwen_jax.parallel.mesh import make_mesh  # noqa: E402
from qwen_jax.train.datasets import build_run_data  # noqa: E402
from qwen_jax.train.loop import rules_from_config  # noqa: E402
from qwen_jax.train.step import make_trainer  # noqa: E402

WORKERS = (0, 1, 2)
STEP_MESHES = {"one device": 1, "8 devices (data=8)": 8}


def run_data(config, workers: int, workdir: Path):
    """The run's data as `qwen-jax train` builds it, with `workers` Grain worker processes."""
    config.data.workers = workers
    return build_run_data(config, workdir, model_config(config), train_config(config),
                          process_index=0, process_count=1)


def time_pipeline(config, workers: int, batches: int, workdir: Path) -> dict:
    """Startup (first batch) and steady batches/s, tokens/s, images/s, videos/s of the train
    iterator."""
    data = run_data(config, workers, workdir)
    try:
        started = time.perf_counter()
        first = next(data.iterator)
        startup = time.perf_counter() - started
        tokens = images = videos = 0
        started = time.perf_counter()
        for _ in range(batches):
            batch = next(data.iterator)
            tokens += batch["input_ids"].size
            images += int(batch["num_images"].sum())
            videos += int(batch["num_videos"].sum()) if "num_videos" in batch else 0
        elapsed = time.perf_counter() - started
    finally:
        data.close()
    rows, seq_len = first["input_ids"].shape
    return {"workers": workers, "startup_s": startup, "batches_per_s": batches / elapsed,
            "tokens_per_s": tokens / elapsed, "images_per_s": images / elapsed,
            "videos_per_s": videos / elapsed, "rows": rows, "seq_len": seq_len}


def time_step(config, devices: int, steps: int, workdir: Path) -> dict:
    """Median step time of the image/video-text train step on `devices` CPU devices -> tokens/s."""
    data = run_data(config, 0, workdir)
    mesh = make_mesh({"data": devices}, jax.devices()[:devices])
    trainer = make_trainer(data.model_config, train_config(config), mesh, rules_from_config(config),
                           images=True, videos=data.videos)
    state = trainer.init_state(config.seed)
    batches = [trainer.global_batch(next(data.iterator)) for _ in range(steps + 1)]
    state, metrics = trainer.step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    times = []
    for batch in batches[1:]:
        started = time.perf_counter()
        state, metrics = trainer.step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    tokens = batches[0]["input_ids"].size
    return {"devices": devices, "step_s": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times), "steps": steps}


def markdown(data: dict) -> str:
    lines = [f"# Image/video-text pipeline vs train step ({data['device']}, {data['date']})", "",
             f"configs/pretrain_mm_tiny.py: {data['rows']} rows x {data['seq_len']} tokens a "
             "batch; rows are half text, 35% image-text (digits + photos), 15% video-text "
             "(moving digits + camera moves).", "",
             "| pipeline | startup s | batches/s | tokens/s | images/s | videos/s |",
             "|---|---|---|---|---|---|"]
    for row in data["pipeline"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:80]} | | | | |")
            continue
        lines.append(f"| {row['workers']} workers | {row['startup_s']:.2f} | "
                     f"{row['batches_per_s']:.1f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['images_per_s']:,.0f} | {row['videos_per_s']:,.0f} |")
    lines += ["", "| train step consumes | step s | tokens/s |", "|---|---|---|"]
    for name, row in data["step"].items():
        lines.append(f"| {name} | error: {row['error'][:80]} |" if "error" in row else
                     f"| {name} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} |")
    lines += ["", f"jax {data['jax']}, grain {data['grain']}, commit {data['commit']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    args = parser.parse_args()
    config = load_config(REPO / "configs" / "pretrain_mm_tiny.py", ["wandb.mode=disabled"])
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)  # the run's tokenizer, trained once and shared by every case
        pipeline = []
        for workers in WORKERS:
            row = guarded(f"{workers} workers",
                          lambda: time_pipeline(config, workers, args.batches, workdir))
            pipeline.append({"name": f"{workers} workers", **row})
            print(pipeline[-1], flush=True)
        step = {}
        for name, devices in STEP_MESHES.items():
            step[name] = guarded(name, lambda: time_step(config, devices, args.steps, workdir))
            print(name, step[name], flush=True)
    shape = next(row for row in pipeline if "rows" in row)
    data = {"device": f"{jax.devices()[0].device_kind} x{os.cpu_count()} cores",
            "date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "grain": getattr(grain, "__version__", "?"), "commit": git_commit(),
            "python": sys.version.split()[0], "rows": shape["rows"], "seq_len": shape["seq_len"],
            "pipeline": pipeline, "step": step}
    print(write_report(args.out, f"mm_pipeline_{jax.devices()[0].platform}", data, markdown))


if __name__ == "__main__":
    main()
