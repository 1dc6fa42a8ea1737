"""Training-throughput benchmark: our full train step against transformers' Qwen3_5ForCausalLM + torch AdamW.

    python experiments/benchmarks/bench_train.py [--quick] [--wait-quiet S] [--out experiments/results]

On CPU: the tiny preset, fp32, ours vs the transformers peer (eager attention, torch fallback kernels).
On a GPU: the qwen3.5-0.8b preset (bf16 compute, fp32 params, remat "dots") at seq 4096, plus the fla
peer's `peer_torch.py train` when QWEN_JAX_PEER_DIR holds it and its wheels (/work/shared/bench/README.md).
Every (side, shape) runs in its own subprocess (`--side ours|torch --case JSON`) so that its peak
memory is its own. Writes train_<device>.json (raw step times) and train_<device>.md to --out.
"""

from __future__ import annotations

import os
import sys

# The orchestrating process only spawns and reports; it must not take the GPU memory its children
# need. Children get the environment as it was, saved before this line.
CHILD_ENV = dict(os.environ)
if "--side" not in sys.argv:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import REPO, git_commit, run_peer, write_report  # noqa: E402
CPU_SHAPES = [(8, 256), (4, 512)]  # (batch, seq)
GPU_SHAPES = [(2, 4096), (4, 4096), (8, 4096)]
GPU_MODEL = {"preset": "qwen3.5-0.8b",
             "overrides": {"dtype": "bfloat16", "param_dtype": "float32", "remat": "dots"}}
TIMEOUT_S = {"cpu": 900, "gpu": 1200}  # per subprocess; a side past it is recorded as stuck
RESULT = "RESULT "  # prefix of a child's one result line on stdout


# ---------------------------------------------------------------- the two sides (each in its own process)


def random_tokens(case):
    """[B, T+1] random token ids, the same for both sides (seeded)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, case["vocab_size"], (case["batch"], case["seq"] + 1), dtype=np.int32)


def time_steps(step, sync, warmup, steps):
    """First step (compile + run) timed apart, warmup - 1 more untimed, then `steps` timed -> dict."""
    start = time.perf_counter()
    losses = [sync(step())]
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(step())
    times_ms = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(sync(step()))
        times_ms.append((time.perf_counter() - start) * 1e3)
    return {"first_step_s": first_step_s, "times_ms": times_ms, "median_ms": statistics.median(times_ms),
            "min_ms": min(times_ms), "loss_first": losses[0], "loss_last": losses[-1]}


def run_ours(case):
    """Our jitted, sharded train step (AdamW via make_trainer) on one device."""
    import jax

    from qwen_jax.config import TrainConfig, preset
    from qwen_jax.parallel.mesh import make_mesh
    from qwen_jax.parallel.rules import DEFAULT_RULES
    from qwen_jax.train.step import make_trainer

    model_config = preset(case["preset"], **case["overrides"])
    # A constant lr, as the peer's plain AdamW: the two loss curves are then comparable.
    train_config = TrainConfig(batch_size=case["batch"], seq_len=case["seq"], lr=3e-4, warmup_steps=0,
                               schedule="constant", **case.get("train_overrides", {}))
    trainer = make_trainer(model_config, train_config, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    tokens = random_tokens(case)
    ones = np.ones((case["batch"], case["seq"]), np.int32)
    batch = trainer.global_batch({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "segment_ids": ones, "loss_mask": ones.astype(np.float32)})
    state = trainer.init_state(0)
    jax.block_until_ready(state)

    def step():
        nonlocal state
        state, metrics = trainer.step_fn(state, batch)
        return state, metrics

    def sync(out):
        jax.block_until_ready(out)
        return float(out[1]["learning/loss"])

    result = time_steps(step, sync, case["warmup"], case["steps"])
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    if case.get("profile_steps"):
        result["profile"] = profile_steps(step, sync, case["profile_steps"],
                                          lambda: trainer.step_fn.lower(state, batch).compile().as_text())
    return result


def profile_steps(step, sync, count, program_text):
    """Trace `count` more steps (after the timed ones, which the tracing would slow) -> where their time went:
    qwen_jax.train.profiling's summary, its op list cut to the top 12."""
    from qwen_jax.train.profiling import StepProfiler

    with tempfile.TemporaryDirectory() as directory:
        profiler = StepProfiler(Path(directory), 1, count, program_text)
        for number in range(1, count + 1):
            profiler.before_step(number)
            start = time.perf_counter()
            sync(step())
            summary = profiler.after_step(number, time.perf_counter() - start)
    if summary is None:  # the profiler warned why (its stderr is in the report only on an error)
        return {"error": "no trace summary: the profiler could not trace or summarise"}
    summary["top_ops"] = summary["top_ops"][:12]
    return summary


def run_torch(case):
    """transformers' Qwen3_5ForCausalLM (eager attention, fp32) + torch.optim.AdamW on CPU."""
    import importlib.util

    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(**case["hf_config"])
    config._attn_implementation = "eager"
    model = Qwen3_5ForCausalLM(config).to(torch.float32).train()
    # Decay only matmul / embedding / conv weights (ndim >= 2), as our optimizer's mask does.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.tensor(random_tokens(case)[:, :-1], dtype=torch.long)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    result = time_steps(step, lambda loss: float(loss), case["warmup"], case["steps"])
    result.update(torch_threads=torch.get_num_threads(), attn_implementation=model.config._attn_implementation,
                  fla_installed=importlib.util.find_spec("fla") is not None,
                  causal_conv1d_installed=importlib.util.find_spec("causal_conv1d") is not None)
    return result


def child(side, case):
    """Run one side of one case; print its result (or its error, e.g. OOM) as one JSON line."""
    try:
        result = (run_ours if side == "ours" else run_torch)(case)
    except Exception as e:  # noqa: BLE001 - the report records it; one OOM must not end the run
        text = str(e)
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        result = {"error": "OOM" if oom else "error", "detail": repr(e)[:1000]}
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


def wait_quiet(max_s, threshold=0.8):
    """Wait (up to max_s) for the 1-min load average to drop below threshold; -> seconds waited."""
    start = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - start < max_s:
        time.sleep(10)
    return time.perf_counter() - start


def spawn(side, case, timeout_s):
    """Run `--side side --case case` in a fresh interpreter -> its result dict (or why there is none)."""
    env = dict(CHILD_ENV)
    if side == "ours":
        # jaxlib's CPU LAPACK calls already use XLA's thread pool; OpenBLAS threads on top oversubscribe
        # (see bench_foundation.py). torch uses MKL + OpenMP and keeps its own threads.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    command = [sys.executable, __file__, "--side", side, "--case", json.dumps(case)]
    loadavg = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "loadavg_1m_before": loadavg}
    lines = [line[len(RESULT):] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    result = json.loads(lines[-1]) if lines else {"error": f"exit {done.returncode}, no result"}
    if "error" in result:
        result["stderr_tail"] = done.stderr[-2000:]
    result.update(wall_s=time.perf_counter() - start, loadavg_1m_before=loadavg,
                  loadavg_1m_after=os.getloadavg()[0])
    return result


def derive(result, tokens, flops_per_token, peak):
    """Add tokens/s and MFU to a timed result."""
    if "median_ms" in result:
        result["tokens_per_s"] = tokens / (result["median_ms"] / 1e3)
        result["mfu"] = flops_per_token * result["tokens_per_s"] / peak
    return result






# ---------------------------------------------------------------- report


def fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def load_text(result):
    """The 1-min load average before / after a side ran: the noise it ran under."""
    return f"{fmt(result.get('loadavg_1m_before'), '.1f')} / {fmt(result.get('loadavg_1m_after'), '.1f')}"


def markdown(data):
    """The report: a header, one row per (shape, side), and the fla peer's lines on a GPU."""
    m = data["meta"]
    v = m["versions"]
    overrides = " " + json.dumps(m["model"]["overrides"]) if m["model"]["overrides"] else ""
    lines = [f"# Training throughput on {m['device']} ({m['date']})", "",
             f"jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, transformers "
             f"{v['transformers']}; {m['cpu_count']} CPUs; 1-min load {m['loadavg_start'][0]:.2f} at start, "
             f"{m['loadavg_end'][0]:.2f} at end; commit {m['git_commit']}; total {m['total_s']:.0f} s"
             f"{' (--quick)' if m['quick'] else ''}.", "",
             f"Model `{m['model']['preset']}`{overrides}. Median of {m['steps']} timed "
             f"steps (min ms shows the noise) after {m['warmup']} warm-up step(s) (the first = compile, shown "
             "apart). MFU = F x tokens/s "
             f"/ {m['peak_flops']:.3g} FLOP/s, F = {m['flops_per_token_note']}"
             + (" (a nominal CPU peak: compare runs, not devices)." if m["backend"] == "cpu" else ".")
             + " ours/peer = tokens/s ratio (> 1: ours is faster). Ours also clips the global grad norm and "
             "guards against non-finite steps; the peer does neither. Both: AdamW, lr 3e-4 constant, betas "
             "(0.9, 0.95), weight decay 0.1 on matmul weights, the same random tokens."
             + (" Peer (torch): transformers' Qwen3_5ForCausalLM, fp32, eager attention, its pure-PyTorch "
                "delta-rule and conv fallbacks, torch threads = CPU count." if m["backend"] == "cpu" else ""), "",
             "| shape | side | step ms | min ms | tokens/s | MFU % | first step s | peak RSS MB | peak device GB "
             "| loss first -> last | load before / after | ours/peer |", "|" + "---|" * 12]
    for case in data["cases"]:
        peer = case.get("torch") or {}
        for side in ("ours", "torch"):
            r = case.get(side)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| B{case['batch']} x T{case['seq']} | {side} | {r['error']} | | | | | "
                             f"{fmt(r.get('peak_rss_mb'), '.0f')} | | | {load_text(r)} | |")
                continue
            ratio = (fmt(r["tokens_per_s"] / peer["tokens_per_s"], ".2f")
                     if side == "ours" and "tokens_per_s" in peer else "")
            lines.append(f"| B{case['batch']} x T{case['seq']} | {side} | {r['median_ms']:.1f} | "
                         f"{r['min_ms']:.1f} | {r['tokens_per_s']:.0f} | {fmt(r['mfu'], '.2f', 100)} | "
                         f"{r['first_step_s']:.2f} | "
                         f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(r.get('peak_device_bytes'), '.2f', 1e-9)} | "
                         f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {load_text(r)} | {ratio} |")
    if data.get("peer") is not None:
        lines += ["", "fla peer (`peer_torch.py train`, transformers + fla Triton kernels, bf16, own process):",
                  "", "```"] + [json.dumps(line) for line in data["peer"].get("lines", [])]
        lines += [json.dumps({k: v for k, v in data["peer"].items() if k != "lines"}), "```"]
    return "\n".join(lines) + "\n"


def save(out, slug, data):
    """Write train_<slug>.json and .md; -> the markdown."""
    return write_report(out, f"train_{slug}", data, markdown)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed steps")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each side, wait up to S s for the 1-min load average to fall below 0.8")
    parser.add_argument("--side", choices=("ours", "torch"), help="internal: run one side of --case")
    parser.add_argument("--case", help="internal: the case as JSON")
    args = parser.parse_args()
    if args.side:
        return child(args.side, json.loads(args.case))

    import jax

    from qwen_jax.config import preset
    from qwen_jax.interop.hf import config_to_hf
    from qwen_jax.train.metrics import peak_flops, train_flops_per_token

    start, loadavg_start = time.perf_counter(), os.getloadavg()
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    model = GPU_MODEL if on_gpu else {"preset": "tiny", "overrides": {}}
    model_config = preset(model["preset"], **model["overrides"])
    warmup, steps = (1, 3) if args.quick else (2, 12)
    peak = peak_flops()
    meta = {
        "device": device, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "versions": {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch",
                                                                "transformers")}
        | {"python": sys.version.split()[0]},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "quick": args.quick, "warmup": warmup, "steps": steps,
        "model": model, "peak_flops": peak, "xla_flags": CHILD_ENV.get("XLA_FLAGS"),
        "flops_per_token_note": "qwen_jax.train.metrics.train_flops_per_token (6 N_w + attention + GDN)",
        "loadavg_start": loadavg_start, "wait_quiet_s": args.wait_quiet,
    }
    data = {"meta": meta, "cases": [], "peer": None}
    out = Path(args.out)

    peer_dir = CHILD_ENV.get("QWEN_JAX_PEER_DIR")
    if on_gpu and peer_dir:
        print(f"fla peer from {peer_dir}", flush=True)
        data["peer"] = run_peer(peer_dir, "train", env=CHILD_ENV, timeout_s=3600)
        for line in data["peer"].get("lines", []):
            if "tok_s" in line:  # the peer's model is the 0.8B shape at seq 4096: the same F applies
                line["mfu"] = train_flops_per_token(model_config, line["seq"]) * line["tok_s"] / peak

    for batch, seq in GPU_SHAPES if on_gpu else CPU_SHAPES:
        case = {**model, "batch": batch, "seq": seq, "vocab_size": model_config.vocab_size,
                "warmup": warmup, "steps": steps, "hf_config": config_to_hf(model_config),
                "flops_per_token": train_flops_per_token(model_config, seq)}
        # The torch CPU peer is the CPU story only; on a GPU the fla peer stands in for it.
        for side in ("ours",) if on_gpu else ("ours", "torch"):
            print(f"B{batch} x T{seq}: {side}", flush=True)
            waited_s = wait_quiet(args.wait_quiet)
            result = spawn(side, {k: v for k, v in case.items() if k != "flops_per_token"},
                           TIMEOUT_S["gpu" if on_gpu else "cpu"])
            result["waited_quiet_s"] = waited_s
            case[side] = derive(result, batch * seq, case["flops_per_token"], peak)
            print("  " + json.dumps({k: v for k, v in result.items() if k not in ("times_ms", "stderr_tail")}),
                  flush=True)
        case.pop("hf_config")
        data["cases"].append(case)
        meta.update(total_s=time.perf_counter() - start, loadavg_end=os.getloadavg())
        save(out, slug, data)  # after every case, so an interrupted run still leaves its figures

    table = save(out, slug, data)
    print("\n" + table)
    print(f"wrote {out}/train_{slug}.json and .md in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
