"""Decode throughput: qwen_jax.generate against transformers' generate on the same random model.

    python experiments/benchmarks/bench_decode.py [--quick] [--max-length N] [--out experiments/results]

On CPU: a tiny config (fp32, the `tiny` preset's shape at vocab 4096), prompt 64, 32 new tokens,
batch 1, 16, 64, 256. On a GPU: the Qwen3.5-0.8B shape in bf16, prompt 128, 256 new tokens, batch
1, 16, 64, 256 (the peer's figure to beat: 1.7K new tokens/s at batch 64 on an H100). Both sides
decode greedily for exactly N new tokens (no stop ids). Writes decode_<device>.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench_foundation.py
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the torch peer shares the GPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen3_5ForCausalLM  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax.interop.hf import config_to_hf  # noqa: E402

from common import REPO, git_commit, guarded  # noqa: E402

CPU = dict(preset="tiny", overrides={}, prompt=64, new=32, batches=(1, 16, 64, 256), dtype="float32")
GPU = dict(preset="qwen3.5-0.8b", overrides={}, prompt=128, new=256, batches=(1, 16, 64, 256),
           dtype="bfloat16")


def timed(fn, repeats):
    """(first call s, median s of `repeats` more calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 16 only, one repeat")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--max-length", type=int, default=0,
                        help="size our cache for this many columns (a long budget, as RL rollouts size it); "
                             "transformers' cache grows with the tokens. Writes decode_<device>_max<N>.*")
    args = parser.parse_args()
    device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    shape = GPU if device == "gpu" else CPU
    batches = shape["batches"][:2] if args.quick else shape["batches"]
    repeats = 1 if args.quick else 3
    config = qwen_jax.preset(shape["preset"], **shape["overrides"])
    torch_device = "cuda" if device == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as directory:
        from transformers import Qwen3_5TextConfig

        hf_config = Qwen3_5TextConfig(**config_to_hf(config))
        hf_config._attn_implementation = "sdpa"
        peer = Qwen3_5ForCausalLM(hf_config).eval()
        peer.save_pretrained(directory)
        ours = qwen_jax.load_hf(directory, dtype=shape["dtype"])
    peer = peer.to(torch_device, getattr(torch, shape["dtype"]))
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, (batch, shape["prompt"]))
        new = shape["new"]

        def run_ours():
            out = qwen_jax.generate(ours, prompts.tolist(), max_new_tokens=new, max_length=args.max_length or None)
            jax.block_until_ready(out.tokens)

        def run_peer():
            with torch.no_grad():
                peer.generate(torch.as_tensor(prompts, device=torch_device), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)
            if torch_device == "cuda":
                torch.cuda.synchronize()

        row = {"batch": batch, "prompt": shape["prompt"], "new_tokens": new}
        for side, fn in (("ours", run_ours), ("transformers", run_peer)):
            result = guarded(f"{side} batch {batch}", lambda: timed(fn, repeats))
            if isinstance(result, dict):
                row[side] = result
                continue
            first, median = result
            row[side] = {"first_call_s": first, "median_s": median, "new_tokens_per_s": batch * new / median}
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, device, shape, args)


def write(rows, device, shape, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = {name: metadata.version(name) for name in ("jax", "flax", "torch", "transformers")}
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 device=str(jax.devices()[0].device_kind), cpus=os.cpu_count(), versions=versions,
                 commit=git_commit(), quick=args.quick, shape=shape)
    name = f"decode_{device}" + (f"_max{args.max_length}" if args.max_length else "")
    (out / f"{name}.json").write_text(json.dumps({**stamp, "max_length": args.max_length, "rows": rows}, indent=2))
    cache = f"our cache {args.max_length} columns, " if args.max_length else ""
    lines = [f"# Decode throughput on {device} ({stamp['date']})", "",
             f"{shape['preset']} ({shape['dtype']}), prompt {shape['prompt']}, {shape['new']} new tokens, {cache}"
             f"greedy; device {stamp['device']}, {stamp['cpus']} CPUs; "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; commit {stamp['commit']}. "
             "Median of the timed calls after a first call (compile); one call = prefill + all "
             "new tokens. ours/peer > 1: ours is faster.", "",
             "| batch | ours new tok/s | transformers new tok/s | ours/peer | ours first call s |",
             "|---|---|---|---|---|"]
    for row in rows:
        ours, peer = row["ours"], row["transformers"]
        if "median_s" not in ours or "median_s" not in peer:
            lines.append(f"| {row['batch']} | {ours} | {peer} | - | - |")
            continue
        lines.append(f"| {row['batch']} | {ours['new_tokens_per_s']:,.0f} | {peer['new_tokens_per_s']:,.0f} | "
                     f"{ours['new_tokens_per_s'] / peer['new_tokens_per_s']:.2f} | {ours['first_call_s']:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
