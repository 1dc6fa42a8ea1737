"""Ours beside the PyTorch peer on one accelerator: the gated delta rule, the 0.8B train step, decode.

    python experiments/benchmarks/bench_accelerator.py [--parts kernel,train,decode] [--out experiments/results]
        [--quick] [--remat dots_no_batch] [--budget 540] [--merge] [--fused-terms] [--reuse-peer JSON]
        [--train-preset qwen3.5-4b --batches 1,2 --param-dtype float32 --opt-state-dtype bfloat16]

Parts, each ours and the peer (`peer_torch.py <kernel|train|gen>` from QWEN_JAX_PEER_DIR, on a GPU only):
  kernel  gated_delta_rule fwd and fwd+bwd at the fla shapes, method "chunked" (pure JAX) and "pallas"
          (on a GPU; elsewhere only with --quick, interpreted), with --fused-terms also "pallas_fused"
          (the fused chunk-terms kernel); each with its relative error against the chunked op on the
          same inputs in float32; then the default Pallas path's halves alone: its chunk terms, and the
          recurrence kernel on them (where the time goes).
  train   the qwen3.5-0.8b train step (bf16 compute, fp32 params, --remat) at seq 4096, batch 2, 4, 8
          until the first OOM; tokens/s, MFU against the datasheet peak and a measured 798 TFLOP/s;
          then the largest batch once more, in a child that traces 2 steps (XLA's command buffers off
          on a GPU, so kernels name their HLO op): where its time went (qwen_jax.train.profiling).
          Another --train-preset (no peer) writes accelerator_<slug>_<preset>.*.
  decode  generate() at batch 64, prompt 128, 256 new tokens, sampling at temperature 1.
--quick: tiny shapes and the tiny preset, no peer (a smoke test, e.g. on CPU). Every measurement of
ours runs in a child process (`--side PART --case JSON`), so that memory and a crash are its own.
Each part gets its share of --budget seconds (unused time passes on); what is past it is skipped.
One H100 call (10 minutes) does not hold all three: the peer's kernel part alone took about 260 s
(fla's Triton autotuning) and the train part with the peer's over 400 s. Run `--parts kernel` in one
call, then `--parts kernel,train --reuse-peer` (the first call's report) and `--parts decode --merge`
in others: --reuse-peer takes each part's peer lines from an earlier report, which the report says.
Writes accelerator_<gpu|cpu>.json (raw timings, the peer's lines) and .md after every case; --merge
keeps the parts of an earlier file that this run does not redo.
"""

from __future__ import annotations

import os
import sys

# Children get the environment as it was, with a 90% memory pool: JAX's default 75% would refuse
# batch sizes that fit. The orchestrator only spawns and reports; it must not take the GPU memory
# its children and the peer need.
CHILD_ENV = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")
CHILD_ENV.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench_foundation.py
if "--side" not in sys.argv:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

# bench_train leaves the environment alone in a process started with --side, as ours are.
from bench_train import RESULT, run_ours, time_steps  # noqa: E402
from common import REPO, git_commit, guarded, run_peer, write_report  # noqa: E402
from qwen_jax import Qwen35ForCausalLM, generate, preset  # noqa: E402
from qwen_jax.config import DTYPES, REMAT_POLICIES  # noqa: E402
from qwen_jax.ops.delta_rule import gated_delta_rule  # noqa: E402
from qwen_jax.ops.pallas.gated_delta_rule import (FUSED_TERMS, kernel_platform, pallas_chunk_terms,  # noqa: E402
                                                  pallas_gated_delta_rule, pallas_rule_from_terms)
from qwen_jax.train.metrics import peak_flops, train_flops_per_token  # noqa: E402

PARTS = ("kernel", "train", "decode")
PEER_PART = {"kernel": "kernel", "train": "train", "decode": "gen"}
BUDGET_SHARE = {"kernel": 3, "train": 5, "decode": 2}  # of --budget; the train part compiles 3 times
MEASURED_PEAK = 798e12  # a large bf16 matmul on the H100 our benchmarks use (perf-anchors section 1)
GRAD_NAMES = ("q", "k", "v", "g", "beta")
CHUNK = 64  # gated_delta_rule's default chunk_size
SETUPS = {
    "full": {
        # The shapes `peer_torch.py kernel` times, so that its lines pair with ours.
        "kernel": {"shapes": [(4, 4096, 16, 128), (1, 16384, 16, 128), (8, 2048, 32, 128)], "warmup": 3,
                   "steps": 10},
        "train": {"preset": "qwen3.5-0.8b", "seq": 4096, "batches": (2, 4, 8), "warmup": 2, "steps": 6,
                  "profile_steps": 2},
        "decode": {"preset": "qwen3.5-0.8b", "batch": 64, "prompt": 128, "new": 256, "warmup": 1, "steps": 3},
    },
    "quick": {
        "kernel": {"shapes": [(1, 256, 2, 64)], "warmup": 3, "steps": 10},
        "train": {"preset": "tiny", "seq": 128, "batches": (2,), "warmup": 1, "steps": 3, "profile_steps": 2},
        "decode": {"preset": "tiny", "batch": 4, "prompt": 16, "new": 8, "warmup": 1, "steps": 2},
    },
}


# ---------------------------------------------------------------- ours (each in a child process)


def block(out):
    """Wait for out; -> None, so that time_steps holds on to no arrays."""
    jax.block_until_ready(out)


def timing(call, warmup, steps):
    """bench_train.time_steps for a call that returns no loss: the times only."""
    result = time_steps(call, block, warmup, steps)
    del result["loss_first"], result["loss_last"]
    return result


def kernel_inputs(shape, seed=0):
    """The peer's inputs: bf16 q, k (l2-normalised), v and do; float32 g = logsigmoid(normal), beta uniform.

    q is scaled by D^-0.5 here: our op takes it scaled, fla scales inside.
    """
    b, t, h, d = shape
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k, v, do = (jax.random.normal(key, (b, t, h, d)) for key in keys[:4])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h)))
    beta = jax.random.uniform(keys[5], (b, t, h))
    bf16 = jnp.bfloat16
    return [(q * d**-0.5).astype(bf16), k.astype(bf16), v.astype(bf16), g, beta], do.astype(bf16)


def delta_rule_fns(method):
    """method -> jitted (forward -> o, fwd+bwd -> grads of sum(o * do) wrt q, k, v, g, beta)."""

    def forward(q, k, v, g, beta):
        if method == "pallas_fused":  # the Pallas path with the fused chunk-terms kernel, whatever the default
            return pallas_gated_delta_rule(q, k, v, g, beta, fused_terms=True)[0]
        return gated_delta_rule(q, k, v, g, beta, method=method)[0]

    def loss(q, k, v, g, beta, do):
        return jnp.sum(forward(q, k, v, g, beta).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(5))))


@jax.jit
def relative_error(x, reference):
    """||x - reference|| / ||reference|| in float32."""
    return jnp.linalg.norm(x.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)


def run_kernel(case):
    """One shape: per method, fwd and fwd+bwd timings with the error against the float32 reference."""
    inputs, do = kernel_inputs(case["shape"])
    # The same values in float32 through the chunked op (Precision.HIGHEST): what a bf16 kernel should approach.
    reference_fwd, reference_grads = delta_rule_fns("chunked")
    exact = [x.astype(jnp.float32) for x in inputs]
    reference = {"fwd": reference_fwd(*exact), "fwd+bwd": reference_grads(*exact, do.astype(jnp.float32))}
    for method in case["methods"]:
        forward, forward_backward = delta_rule_fns(method)
        calls = {"fwd": lambda: forward(*inputs), "fwd+bwd": lambda: forward_backward(*inputs, do)}
        result = {"method": method}
        for mode, call in calls.items():
            result[mode] = guarded(f"{method} {mode}", lambda: timing(call, case["warmup"], case["steps"]))
            if "error" not in result[mode]:
                result[mode]["rel_err"] = errors(call(), reference[mode])
        yield result
    if "pallas" in case["methods"]:
        yield from pallas_parts(inputs, case)


def pallas_parts(inputs, case):
    """The default Pallas path's two halves timed alone: its chunk-local terms, and the recurrence kernel on them."""
    q, k, v, g, beta = inputs
    state0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)

    def terms(*xs):
        return pallas_chunk_terms(*xs, None, CHUNK)

    def recurrence(chunk_terms):
        return pallas_rule_from_terms(chunk_terms, state0, operand=q.dtype)[0]

    def summed(fn):  # a scalar of every output, for a backward through all of them
        return lambda *xs: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fn(*xs)))

    made = terms(*inputs)  # eagerly: the timed forward below still pays its own compile once
    parts = {"terms (fused kernel)" if FUSED_TERMS[kernel_platform()] else "terms (XLA)": (terms, inputs),
             "recurrence kernel": (recurrence, (made,))}
    for name, (fn, args) in parts.items():
        forward, backward = jax.jit(fn), jax.jit(jax.grad(summed(fn), argnums=range(len(args))))
        yield {"method": f"pallas: {name}", "part": True,
               **{mode: guarded(f"{name} {mode}", lambda call=call: timing(lambda: call(*args), case["warmup"],
                                                                          case["steps"]))
                  for mode, call in (("fwd", forward), ("fwd+bwd", backward))}}


def errors(out, reference):
    """The output's relative error (fwd), or each gradient's by input name (fwd+bwd)."""
    if isinstance(out, jax.Array):
        return float(relative_error(out, reference))
    return {name: float(relative_error(x, r)) for name, x, r in zip(GRAD_NAMES, out, reference)}


def run_train(case):
    """bench_train's run_ours: the jitted AdamW train step on one device."""
    yield run_ours(case)


def run_decode(case):
    """generate() on a random-weight model, sampling; every row must run to case["new"] tokens (no stop ids)."""
    config = preset(case["preset"], **case["overrides"])
    model = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (case["batch"], case["prompt"])).tolist()

    def step():
        return generate(model, prompts, max_new_tokens=case["new"], temperature=case["temperature"])

    def shortest_row(out):
        return int(jnp.min(out.lengths))  # also waits for the call; kept by time_steps as its "loss"

    result = time_steps(step, shortest_row, case["warmup"], case["steps"])
    result["new_tokens_min"] = min(result.pop("loss_first"), result.pop("loss_last"))
    result["peak_device_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    yield result


RUNNERS = {"kernel": run_kernel, "train": run_train, "decode": run_decode}


def child(side, case):
    """Run one part of ours on one case; print each result (or the error that ended it, e.g. OOM) as a JSON line."""
    try:
        for result in RUNNERS[side](case):
            print(RESULT + json.dumps(result), flush=True)
    except Exception as e:  # noqa: BLE001 - the report records it; one OOM must not end the run
        oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        print(RESULT + json.dumps({"error": "OOM" if oom else "error", "detail": repr(e)[:1000]}), flush=True)


# ---------------------------------------------------------------- orchestration


def spawn(side, case, timeout_s, env=CHILD_ENV):
    """Run `--side side --case JSON` in a fresh interpreter -> {"results", "wall_s"}, + "error" if it did not finish."""
    command = [sys.executable, __file__, "--side", side, "--case", json.dumps(case)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr = done.stdout, done.stderr
        failure = f"exit {done.returncode}" if done.returncode else None
    except subprocess.TimeoutExpired as e:
        # What it printed before the kill still counts; POSIX hands it back as bytes even with text=True.
        stdout, stderr = ((s.decode() if isinstance(s, bytes) else s or "") for s in (e.stdout, e.stderr))
        failure = f"timed out after {timeout_s:.0f} s (the part's budget)"
    spawned = {"results": [json.loads(line[len(RESULT):]) for line in stdout.splitlines() if line.startswith(RESULT)],
               "wall_s": time.perf_counter() - start}
    if failure:
        spawned["error"] = failure
    if failure or any("error" in r for r in spawned["results"]):
        spawned["stderr_tail"] = stderr[-2000:]
    return spawned


def single(spawned):
    """A one-result child's result (with its wall time), or why there is none."""
    result = spawned["results"][-1] if spawned["results"] else {"error": spawned.get("error") or "no result"}
    return {**result, **{k: v for k, v in spawned.items() if k in ("wall_s", "stderr_tail")}}


def show(result):
    """Print a result without its lists of times."""

    def short(x):
        if isinstance(x, dict):
            return {k: short(v) for k, v in x.items() if k not in ("times_ms", "stderr_tail")}
        return [short(v) for v in x] if isinstance(x, list) else x

    print("  " + json.dumps(short(result))[:1500], flush=True)


def seconds_left(deadline):
    """Seconds until a perf_counter deadline (negative once past)."""
    return deadline - time.perf_counter()


def peer(part, peer_dir, deadline):
    """The peer's lines for this part (its own process, before ours), or None without a peer."""
    if peer_dir is None:
        return None
    print(f"peer: peer_torch.py {PEER_PART[part]}", flush=True)
    return run_peer(peer_dir, PEER_PART[part], env=CHILD_ENV, timeout_s=max(1, int(seconds_left(deadline))))


def bench_kernel(record, setup, deadline, peer_dir, save):
    """Per shape, one child: every method's fwd and fwd+bwd (a crash in one keeps the methods before it)."""
    # Off a GPU the Pallas kernel runs in interpret mode: a check of its numbers at --quick's tiny
    # shape, hopeless at the full ones.
    pallas = jax.default_backend() == "gpu" or record["run"]["quick"]
    record["methods"] = ["chunked"]
    if pallas:
        record["methods"] += ["pallas"] + (["pallas_fused"] if setup["fused_terms"] else [])
    record["peer"] = record["peer"] or peer("kernel", peer_dir, deadline)
    save()
    for shape in setup["shapes"]:
        case = {"shape": shape, "methods": record["methods"], "warmup": setup["warmup"], "steps": setup["steps"]}
        print(f"kernel B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]}", flush=True)
        if seconds_left(deadline) <= 0:
            record["cases"].append({"shape": shape, "skipped": "past the part's budget"})
            continue
        spawned = spawn("kernel", case, seconds_left(deadline))
        record["cases"].append({"shape": shape, **spawned})
        show(spawned)
        save()


def utilisation(tokens_per_s, flops_per_token):
    """MFU against the datasheet peak (qwen_jax.train.metrics.peak_flops) and against the measured one."""
    achieved = flops_per_token * tokens_per_s
    return {"mfu": achieved / peak_flops(), "mfu_measured_peak": achieved / MEASURED_PEAK}


def bench_train(record, setup, deadline, peer_dir, save):
    """Batch sizes in order, one child each, up to the first failure (after an OOM: the largest batch that fits)."""
    config = preset(setup["preset"], **record["model"]["overrides"])
    flops_per_token = train_flops_per_token(config, setup["seq"])
    record.update(flops_per_token=flops_per_token, peak_flops=peak_flops(), measured_peak_flops=MEASURED_PEAK)
    record["peer"] = record["peer"] or peer("train", peer_dir, deadline)
    for line in (record["peer"] or {}).get("lines", []):
        if "tok_s" in line:  # the peer's model is the 0.8B shape at seq 4096 too: the same F applies
            line.update(utilisation(line["tok_s"], flops_per_token))
    save()

    def case_for(batch, **changes):
        return {**record["model"], "batch": batch, "seq": setup["seq"], "vocab_size": config.vocab_size,
                "warmup": setup["warmup"], "steps": setup["steps"], **changes}

    previous_wall_s = 0.0
    for batch in setup["batches"]:
        print(f"train B{batch} x T{setup['seq']}", flush=True)
        # A child that cannot finish in time only takes time from the parts after this one.
        if seconds_left(deadline) <= previous_wall_s:
            record["cases"].append({"batch": batch, "seq": setup["seq"], "skipped": "past the part's budget"})
            break
        result = single(spawn("train", case_for(batch), seconds_left(deadline)))
        if "median_ms" in result:
            result["tokens_per_s"] = batch * setup["seq"] / (result["median_ms"] / 1e3)
            result.update(utilisation(result["tokens_per_s"], flops_per_token))
        record["cases"].append({"batch": batch, "seq": setup["seq"], **result})
        show(result)
        save()
        if "error" in result:
            break
        previous_wall_s = result["wall_s"]
    ran = [c for c in record["cases"] if "median_ms" in c]
    if ran and seconds_left(deadline) > ran[-1]["wall_s"]:
        case = case_for(ran[-1]["batch"], warmup=1, steps=1, profile_steps=setup["profile_steps"])
        record["profile"] = profile_train(case, seconds_left(deadline))
        save()


def profile_train(case, timeout_s):
    """The largest batch that ran, once more in a child that traces `profile_steps` steps -> where their time went.

    Its own child, so that the timed steps keep XLA's defaults: on a GPU this one turns XLA's command buffers
    off, since kernels replayed from them name no HLO op and the summary could not say which part ran them.
    """
    env = CHILD_ENV
    if jax.default_backend() == "gpu":
        env = dict(CHILD_ENV, XLA_FLAGS=f"{CHILD_ENV.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip())
    result = single(spawn("train", case, timeout_s, env))
    return {"batch": case["batch"], "seq": case["seq"], **result.get("profile", {"error": error_text(result)})}


def bench_decode(record, setup, deadline, peer_dir, save):
    """One child: generate() at the peer's batch, prompt and length, sampling at temperature 1."""
    record["peer"] = record["peer"] or peer("decode", peer_dir, deadline)
    save()
    case = {**record["model"], **{k: setup[k] for k in ("batch", "prompt", "new", "warmup", "steps")},
            "temperature": 1.0}
    print(f"decode batch {setup['batch']}, prompt {setup['prompt']}, {setup['new']} new tokens", flush=True)
    result = single(spawn("decode", case, seconds_left(deadline)))
    if "median_ms" in result:
        result["new_tokens_per_s"] = setup["batch"] * setup["new"] / (result["median_ms"] / 1e3)
    record["cases"].append({**case, **result})
    show(result)


BENCHES = {"kernel": bench_kernel, "train": bench_train, "decode": bench_decode}


def run_part(part, record, setup, deadline, peer_dir, save_all):
    """One part, the report rewritten after every case; a bug in one part leaves the others to run."""
    start = time.perf_counter()

    def save_part():
        record["total_s"] = time.perf_counter() - start
        save_all()

    failed = guarded(part, lambda: BENCHES[part](record, setup, deadline, peer_dir, save_part))
    if failed:
        record["error"] = failed["error"]
    record["complete"] = not failed
    save_part()


def versions():
    """Installed versions of what makes the figures (None where missing)."""
    found = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": sys.version.split()[0]}


def stamp(args, budget_s):
    """Where and when one part was measured (parts merged from several runs keep their own)."""
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "quick": args.quick, "budget_s": budget_s, "argv": sys.argv[1:],
            "child_env": {k: CHILD_ENV.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                        "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")}}


# ---------------------------------------------------------------- report


def fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def ratio(peer_value, ours_value):
    """peer / ours as text (> 1: ours is faster when both are times), or "-"."""
    return f"{peer_value / ours_value:.2f}" if peer_value and ours_value else "-"


def peer_lines(record, what):
    """The peer's JSON lines of one kind."""
    return [line for line in (record.get("peer") or {}).get("lines", []) if line.get("what") == what]


def error_text(result):
    """A failed / skipped result -> a short cell."""
    return result.get("skipped") or result.get("error") or "-"


def section_head(title, record):
    """A part's title and the line saying when, where and with what it was measured."""
    s, v = record["run"], record["run"]["versions"]
    state = "complete" if record["complete"] else "INCOMPLETE (interrupted, still running, or failed)"
    if "error" in record:
        state += f": {record['error'][:200]}"
    return [f"## {title}", "",
            f"{s['date']}, commit {s['git_commit']}{', --quick' if s['quick'] else ''}; {state}; "
            f"{record.get('total_s', 0):.0f} s of a {s['budget_s']:.0f} s budget. jax {v['jax']}, "
            f"flax {v['flax']}, torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}.", ""]


def peer_block(record):
    """The peer's raw lines and exit status, as they came."""
    if record.get("peer") is None:
        return ["", "No peer in this part (needs a GPU, QWEN_JAX_PEER_DIR, and no --quick)."]
    status = {k: v for k, v in record["peer"].items() if k not in ("lines", "reused_from")}
    source = "own process, same job"
    if earlier := record["peer"].get("reused_from"):
        source = f"own process, an earlier job on a {earlier['device']} of {earlier['date']} (--reuse-peer)"
    return (["", f"Peer lines (`peer_torch.py`, {source}):", "", "```"]
            + [json.dumps(line) for line in record["peer"].get("lines", [])] + [json.dumps(status), "```"])


def kernel_rows(case, fla):
    """Markdown rows of one kernel shape: ours per mode and method, fla, then whatever ended the child."""
    b, t, h, d = case["shape"]
    label = f"B{b} T{t} H{h} D{d}"
    peer_line = next((x for x in fla if (x["B"], x["T"], x["H"], x["K"]) == (b, t, h, d)), {})
    methods = [r for r in case.get("results", []) if "method" in r]
    rows = []
    for mode, peer_key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms")):
        for result in methods:
            r = result[mode]
            if "median_ms" not in r:
                rows.append(f"| {label} | {mode} | ours {result['method']} | {error_text(r)[:120]} | | | | |")
                continue
            error, versus = "-", "-"  # a part of the Pallas path: no output of the rule to compare
            if not result.get("part"):
                errors = r["rel_err"] if isinstance(r["rel_err"], dict) else {"o": r["rel_err"]}
                worst = max(errors, key=errors.get)
                error, versus = f"{errors[worst]:.1e} ({worst})", ratio(peer_line.get(peer_key), r["median_ms"])
            rows.append(f"| {label} | {mode} | ours {result['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                        f"{r['first_step_s']:.1f} | {versus} | {error} |")
        if peer_line:
            rows.append(f"| {label} | {mode} | fla | {peer_line[peer_key]:.2f} | | | | |")
    ended = [r for r in case.get("results", []) if "method" not in r]  # e.g. an OOM outside one method's guard
    if "error" in case or "results" not in case:  # the child crashed or timed out, or never ran
        ended.append(case)
    return rows + [f"| {label} | | ours (child) | {error_text(r)[:120]} | | | | |" for r in ended]


def kernel_md(record):
    """The kernel section: ms per call, fla/ours, error against float32."""
    lines = section_head("Gated delta rule kernel", record)
    lines += ["bf16 q, k (l2-normalised), v; float32 g = logsigmoid(normal), beta uniform (the peer's beta is "
              f"bf16); methods {record.get('methods')}. Median of the timed calls after warm-up (first call = "
              "compile + run). fla/ours > 1: ours is faster. Error: ||out - ref|| / ||ref|| against the chunked "
              "op on the same values in float32 (fwd: o; fwd+bwd: the worst of dq, dk, dv, dg, dbeta); for chunked "
              "itself that is only the rounding of its bf16 outputs, the floor to read the others against.", "",
              "| shape | mode | impl | ms | min ms | first call s | fla/ours | rel. error vs fp32 |",
              "|" + "---|" * 8]
    fla = peer_lines(record, "fla_chunk_gdr")
    for case in record["cases"]:
        lines += kernel_rows(case, fla)
    return lines + peer_block(record)


def train_md(record):
    """The train section: ours per batch, the peer per batch, and the largest batches side by side."""
    m = record["model"]
    lines = section_head("Train step", record)
    lines += [f"`{m['preset']}` {json.dumps(m['overrides'])}, AdamW {json.dumps(m.get('train_overrides', {}))}, "
              "random tokens; F = "
              f"{record['flops_per_token'] / 1e9:.2f} GFLOP/token (qwen_jax.train.metrics.train_flops_per_token); "
              f"MFU against {record['peak_flops'] / 1e12:.3g} TFLOP/s (datasheet) and {MEASURED_PEAK / 1e12:.0f} "
              "(measured). peer/ours = the peer's step time over ours at the same batch (> 1: ours is faster). "
              "The peer: transformers + fla kernels, bf16 params, fused AdamW.", "",
              "| batch x seq | side | step ms | tokens/s | MFU % | MFU % (798) | peak GB | first step s | loss "
              "| peer/ours |",
              "|" + "---|" * 10]
    peer_by_batch = {line["batch"]: line for line in peer_lines(record, "hf_train_step") if not line.get("compiled")}
    for case in record["cases"]:
        shape = f"B{case['batch']} x T{case['seq']}"
        if "median_ms" not in case:
            lines.append(f"| {shape} | ours | {error_text(case)} | | | | | | | |")
            continue
        peer_line = peer_by_batch.get(case["batch"], {})
        lines.append(f"| {shape} | ours | {case['median_ms']:.0f} | {case['tokens_per_s']:,.0f} | "
                     f"{fmt(case['mfu'], '.1f', 100)} | {fmt(case['mfu_measured_peak'], '.1f', 100)} | "
                     f"{fmt(case.get('peak_device_bytes'), '.1f', 1e-9)} | {case['first_step_s']:.0f} | "
                     f"{case['loss_first']:.2f} -> {case['loss_last']:.2f} | "
                     f"{ratio(peer_line.get('step_s'), case['median_ms'] / 1e3)} |")
    for batch, line in sorted(peer_by_batch.items()):
        if "tok_s" not in line:
            lines.append(f"| B{batch} x T{line.get('seq', '-')} | peer | {line.get('error')} | | | | | | | |")
            continue
        lines.append(f"| B{batch} x T{line['seq']} | peer | {line['step_s'] * 1e3:.0f} | {line['tok_s']:,.0f} | "
                     f"{fmt(line['mfu'], '.1f', 100)} | {fmt(line['mfu_measured_peak'], '.1f', 100)} | "
                     f"{line['mem_gb']:.1f} | | | |")
    ours_best = max((c for c in record["cases"] if "tokens_per_s" in c), key=lambda c: c["tokens_per_s"], default=None)
    peer_best = max((x for x in peer_by_batch.values() if "tok_s" in x), key=lambda x: x["tok_s"], default=None)
    if ours_best and peer_best:
        lines += ["", f"Best of each: ours B{ours_best['batch']} {ours_best['tokens_per_s']:,.0f} tokens/s, peer "
                  f"B{peer_best['batch']} {peer_best['tok_s']:,.0f}: peer time per token / ours = "
                  f"{ours_best['tokens_per_s'] / peer_best['tok_s']:.2f}."]
    return lines + profile_md(record.get("profile")) + peer_block(record)


def profile_md(p):
    """Where the largest batch's step time went (qwen_jax.train.profiling's summary): parts, top ops."""
    if not p:
        return []
    if "op_ms_per_step" not in p:
        return ["", f"Where ours' step time went: no profile ({p.get('error')})."]
    lines = ["", f"Where ours' step time went, B{p['batch']} x T{p['seq']}: {p['steps']} steps traced in a child "
             f"of their own, op self time {p['op_ms_per_step']:.1f} ms per step from the {p['events']} trace "
             f"(wall {fmt(p['wall_ms_per_step'], '.1f')} ms while traced).", "",
             "| part | ms per step | share |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['ms_per_step']:.2f} | {r['share']:.1%} |" for r in p["by_part"]]
    lines += ["", "| op | kind | part | source | ms per step | calls |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['kind']} | {r['part']} | {r['source']} | {r['ms_per_step']:.2f} | "
              f"{r['calls_per_step']:g} |" for r in p["top_ops"]]
    return lines


def decode_md(record):
    """The decode section: new tokens/s of ours and of the peer's generate."""
    lines = section_head("Decode", record)
    lines += ["Random weights, bf16, sampling at temperature 1 (no top-k / top-p), exactly the new tokens asked "
              "for. One call = prefill + every new token; median of the timed calls after the first (compile). "
              "peer/ours = the peer's seconds per call over ours (> 1: ours is faster).", "",
              "| batch | prompt | new | side | s per call | new tokens/s | first call s | peak GB | peer/ours |",
              "|" + "---|" * 9]
    gen = next(iter(peer_lines(record, "hf_generate")), None)
    for case in record["cases"]:
        shape = f"| {case['batch']} | {case['prompt']} | {case['new']} | ours"
        if "median_ms" not in case:
            lines.append(f"{shape} | {error_text(case)} | | | | |")
            continue
        lines.append(f"{shape} | {case['median_ms'] / 1e3:.2f} | {case['new_tokens_per_s']:,.0f} | "
                     f"{case['first_step_s']:.0f} | {fmt(case.get('peak_device_bytes'), '.1f', 1e-9)} | "
                     f"{ratio(gen and gen['s'], case['median_ms'] / 1e3)} |")
    if gen:
        lines.append(f"| {gen['batch']} | {gen['prompt']} | {gen['new']} | peer | {gen['s']:.2f} | "
                     f"{gen['new_tok_s']:,.0f} | | | |")
    return lines + peer_block(record)


MARKDOWN = {"kernel": kernel_md, "train": train_md, "decode": decode_md}


def markdown(data):
    """The report: which device, then one section per part measured."""
    latest = max((r["run"] for r in data["parts"].values()), key=lambda s: s["date"])
    v = latest["versions"]
    lines = [f"# Ours (JAX) beside the PyTorch peer on {latest['device']}", "",
             f"Last run {latest['date']}: jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, torch {v['torch']}, "
             f"transformers {v['transformers']}, triton {v['triton']}, python {v['python']}. Each part names its "
             "own run (parts of several runs merge with --merge). Ratios are peer time / our time: > 1 means "
             f"ours is faster. Parts not in this file: {[p for p in PARTS if p not in data['parts']] or 'none'}.", ""]
    for part in PARTS:
        if part in data["parts"]:
            lines += MARKDOWN[part](data["parts"][part]) + [""]
    return "\n".join(lines)


def save(out, slug, data):
    """Write accelerator_<slug>.json and .md; -> the markdown."""
    return write_report(out, f"accelerator_{slug}", data, markdown)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of " + ", ".join(PARTS))
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, the tiny preset, no peer")
    parser.add_argument("--remat", default="dots_no_batch", choices=REMAT_POLICIES, help="the train part's policy")
    parser.add_argument("--train-preset", help="the train part's model (default: the 0.8B; the peer runs only that)")
    parser.add_argument("--batches", help="the train part's batch sizes, comma-separated (default 2,4,8)")
    parser.add_argument("--param-dtype", default="float32", choices=DTYPES, help="the train part's master weights")
    parser.add_argument("--opt-state-dtype", default="float32", choices=DTYPES, help="the train part's Adam moments")
    parser.add_argument("--budget", type=float, default=540, metavar="S",
                        help="seconds for all parts, shared kernel:train:decode = 3:5:2 among those run")
    parser.add_argument("--merge", action="store_true", help="keep the other parts of an existing report")
    parser.add_argument("--fused-terms", action="store_true",
                        help="the kernel part also times method pallas_fused (the fused chunk-terms kernel)")
    parser.add_argument("--reuse-peer", metavar="JSON", help="take the peer's lines from this earlier report "
                        "(same kind of machine) instead of running the peer again; the report says so")
    parser.add_argument("--side", choices=PARTS, help="internal: run ours for one part on --case")
    parser.add_argument("--case", help="internal: the case as JSON")
    args = parser.parse_args()
    if args.side:
        return child(args.side, json.loads(args.case))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")

    backend = jax.default_backend()
    # Another model than the 0.8B: its own report, and no peer (which trains only the 0.8B shape).
    other_model = args.train_preset not in (None, SETUPS["full"]["train"]["preset"])
    slug = ("gpu" if backend == "gpu" else backend) + (f"_{args.train_preset}" if other_model else "")
    out = Path(args.out)
    path = out / f"accelerator_{slug}.json"
    data = json.loads(path.read_text()) if args.merge and path.exists() else {"parts": {}}
    setups = dict(SETUPS["quick" if args.quick else "full"])
    setups["kernel"] = {**setups["kernel"], "fused_terms": args.fused_terms}
    reused = json.loads(Path(args.reuse_peer).read_text())["parts"] if args.reuse_peer else {}
    setups["train"] = {**setups["train"], **({"preset": args.train_preset} if args.train_preset else {}),
                       **({"batches": tuple(map(int, args.batches.split(",")))} if args.batches else {})}
    models = {"train": {"preset": setups["train"]["preset"],
                        "overrides": {"dtype": "bfloat16", "param_dtype": args.param_dtype, "remat": args.remat},
                        "train_overrides": {"opt_state_dtype": args.opt_state_dtype}},
              "decode": {"preset": setups["decode"]["preset"],
                         "overrides": {"dtype": "bfloat16", "param_dtype": "bfloat16"}}}
    # The peer's shapes are the full ones: beside a --quick run its figures would pair with nothing.
    peer_dir = CHILD_ENV.get("QWEN_JAX_PEER_DIR") if backend == "gpu" and not args.quick else None
    if other_model and "train" in parts:
        peer_dir = None
    print(f"{jax.devices()[0].device_kind}; parts {parts}; peer from {peer_dir}", flush=True)

    start = time.perf_counter()
    deadline = start
    for part in parts:
        # Deadlines add up, so time a part leaves unused passes on to the next.
        budget_s = args.budget * BUDGET_SHARE[part] / sum(BUDGET_SHARE[p] for p in parts)
        deadline += budget_s
        record = {"run": stamp(args, budget_s), "complete": False, "cases": [], "peer": None}
        if (earlier := reused.get(part, {})).get("peer"):
            record["peer"] = {**earlier["peer"], "reused_from": {k: earlier["run"][k] for k in ("date", "device")}}
        if part in models:
            record["model"] = models[part]
        data["parts"][part] = record
        run_part(part, record, setups[part], deadline, peer_dir, lambda: save(out, slug, data))

    print("\n" + save(out, slug, data))
    print(f"wrote {path} and .md in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
