"""Long context: train-step memory per device and tokens/s against sequence length, context-parallel
over 8 (fake CPU) devices beside the same step on one device.

    python experiments/benchmarks/bench_long_context.py [--quick] [--out experiments/results]

The tiny preset (4 layers: 3 Gated DeltaNet, 1 gated attention), batch 1, remat "full". For every length
the step is compiled on both meshes (XLA's memory analysis: arguments and temporaries per device) and,
up to --run-max tokens, timed too (median of the timed steps after one compile-and-run step). Longer
sequences are compiled only: on 2 CPU cores a step at 256K tokens would take many minutes. Writes
long_context_<device>.json (raw figures) and .md (the table) to --out.
"""

from __future__ import annotations

import os

# 8 host devices for the context mesh, set before JAX starts; OpenBLAS threads would oversubscribe.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import REPO, git_commit, guarded  # noqa: E402
from qwen_jax.config import TrainConfig, preset  # noqa: E402
from qwen_jax.parallel.mesh import make_mesh  # noqa: E402
from qwen_jax.parallel.rules import DEFAULT_RULES  # noqa: E402
from qwen_jax.train.step import make_trainer  # noqa: E402

LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
MESHES = {"context=8": {"context": 8}, "one device": {"data": 1}}
GIB = 2**30


def trainer_for(mesh_name, length):
    """The tiny model's jitted train step for one row of `length` tokens on the named mesh."""
    model = preset("tiny", remat="full", max_position_embeddings=max(LENGTHS))
    train = TrainConfig(batch_size=1, seq_len=length, lr=1e-3, warmup_steps=0, schedule="constant")
    devices = jax.devices()[:1] if mesh_name == "one device" else None
    return make_trainer(model, train, make_mesh(MESHES[mesh_name], devices), DEFAULT_RULES)


def one_row(trainer, length):
    """A random row with four packed documents (so segment resets cross shard edges too)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, trainer.model_config.vocab_size, (1, length + 1)).astype(np.int32)
    segments = np.repeat(np.arange(1, 5), length // 4)[None].astype(np.int32)
    return trainer.global_batch({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments,
                                 "loss_mask": np.ones((1, length), np.float32)})


def measure(mesh_name, length, timed_steps):
    """Compile (and, when timed_steps > 0, time) one step -> a dict of figures."""
    trainer = trainer_for(mesh_name, length)
    state, batch = trainer.init_state(seed=0), one_row(trainer, length)
    start = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    result = {"compile_s": time.perf_counter() - start,
              "temp_gib": memory.temp_size_in_bytes / GIB, "argument_gib": memory.argument_size_in_bytes / GIB}
    if timed_steps:
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(timed_steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result.update(step_s=statistics.median(times), times_s=times, tokens_per_s=length / statistics.median(times),
                      loss=float(metrics["learning/loss"]))
    return result


def markdown(data):
    m = data["meta"]
    lines = [f"# Long context on {m['device']} x 8 ({m['date']})", "",
             f"jax {m['versions']['jax']}, flax {m['versions']['flax']}, {m['cpu_count']} CPU cores, commit "
             f"{m['git_commit']}. Tiny preset (3 GDN + 1 attention layer), batch 1, remat full, packed rows. "
             "Memory per device from XLA's memory analysis of the compiled step (temporaries; the arguments are "
             "the train state and batch). one/ctx8 = the one-device figure over the context=8 one.", "",
             "| tokens | ctx8 temp GiB | one device temp GiB | one/ctx8 | ctx8 tok/s | one device tok/s | "
             "ctx8 step s |", "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        split, whole = row["context=8"], row["one device"]

        def get(side, key, spec):
            return format(side[key], spec) if key in side else side.get("error", "-")[:40]

        ratio = (f"{whole['temp_gib'] / split['temp_gib']:.1f}" if "temp_gib" in whole and "temp_gib" in split
                 else "-")
        lines.append(f"| {row['length']:,} | {get(split, 'temp_gib', '.3f')} | {get(whole, 'temp_gib', '.3f')} | "
                     f"{ratio} | {get(split, 'tokens_per_s', ',.0f')} | {get(whole, 'tokens_per_s', ',.0f')} | "
                     f"{get(split, 'step_s', '.2f')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4K and 8K tokens only")
    parser.add_argument("--run-max", type=int, default=16384, help="longest sequence that is also timed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    data = {"meta": {"device": device, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                     "versions": {"jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0]},
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "git_commit": git_commit(), "quick": args.quick, "run_max": args.run_max},
            "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = jax.default_backend()
    for length in LENGTHS[:2] if args.quick else LENGTHS:
        row = {"length": length}
        for mesh_name in MESHES:
            steps = args.steps if length <= args.run_max else 0
            row[mesh_name] = guarded(f"{mesh_name} {length}", lambda: measure(mesh_name, length, steps))
            print(length, mesh_name, json.dumps(row[mesh_name])[:300], flush=True)
        data["rows"].append(row)
        (out / f"long_context_{slug}.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / f"long_context_{slug}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
