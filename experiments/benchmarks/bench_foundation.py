"""Foundation benchmark: the gated delta rule and a tiny model, ours (JAX) against transformers (PyTorch).

    python experiments/benchmarks/bench_foundation.py [--quick] [--out experiments/results]

Writes foundation_<device>.json (every raw timing) and foundation_<device>.md (the table) to --out,
rewritten after every case so that an interrupted run still leaves its figures (marked incomplete).
On CPU it uses small shapes; on a GPU the real ones (bf16 inputs), plus the fla peer when
QWEN_JAX_PEER_DIR holds peer_torch.py and its wheels (see /work/shared/bench/README.md).
"""

from __future__ import annotations

import os

# OpenBLAS threads on top of XLA's own thread pool oversubscribe a small CPU (a LAPACK call once
# stalled ~300 ms on 2 cores). Set before numpy / jax load OpenBLAS; torch uses MKL + OpenMP.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import faulthandler  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax.interop.hf import save_hf  # noqa: E402
from qwen_jax.ops.delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule  # noqa: E402

from common import REPO, git_commit, guarded, run_peer  # noqa: E402
# inspect.unwrap skips transformers' hub-kernel decorator, so "torch" always means its pure PyTorch
# path, even where fla is installed and the decorator would swap fla in.
TORCH_CHUNK = inspect.unwrap(hf_qwen.torch_chunk_gated_delta_rule)
TORCH_RECURRENT = inspect.unwrap(hf_qwen.torch_recurrent_gated_delta_rule)

# (B, T, H, D) per device class; GPU shapes are the ones the fla peer times.
CPU_KERNEL_SHAPES = [(1, 1024, 4, 64), (2, 2048, 4, 64)]
GPU_KERNEL_SHAPES = [(4, 4096, 16, 128), (1, 16384, 16, 128), (8, 2048, 32, 128)]
MODEL_SHAPES = [(4, 256), (2, 1024)]
OURS_METHODS = ("chunked-sequential", "chunked-associative", "recurrent")
TORCH_PEER = {"chunked-sequential": "chunked", "chunked-associative": "chunked", "recurrent": "recurrent"}
MIN_REPEATS = 3  # a case over its time budget still gets this many timed calls
RECURRENT_BWD_MAX_TOKENS = 2048
# No call here should take minutes; one that does is stuck (jaxlib's CPU triangular solve, which
# the op no longer uses, once deadlocked XLA's thread pool), so the run ends with its partial
# report rather than hanging forever.
HANG_S = {"cpu": 240, "gpu": 600}


# ---------------------------------------------------------------- timing


def jax_sync(x):
    """Wait for a pytree of jax arrays; -> it."""
    return jax.block_until_ready(x)


def torch_sync_for(device):
    """A sync function for torch results on `device` (CPU calls are already synchronous)."""
    if device == "cuda":
        return lambda x: torch.cuda.synchronize()
    return lambda x: x


class FirstCall:
    """Wraps fn so that its first call (compile + run) is timed and remembered in .first_call_s."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.first_call_s = fn, sync, None

    def __call__(self, *args):
        if self.first_call_s is not None:
            return self.fn(*args)
        start = time.perf_counter()
        out = self.sync(self.fn(*args))
        self.first_call_s = time.perf_counter() - start
        return out


def measure(fn, sync, repeats, budget_s):
    """Time fn(): one warm-up call, then `repeats` timed calls; fewer past budget_s (not under 3 before 3x it)."""
    start = time.perf_counter()
    sync(fn())
    warmup_s = time.perf_counter() - start
    if warmup_s > budget_s:  # callers compile first, so this is one real call
        return {"skipped": f"one call took {warmup_s:.1f} s, over the {budget_s:.0f} s budget", "warmup_s": warmup_s}
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
        # A loaded machine can slow one call tenfold; the hard cap keeps the run's length bounded.
        if sum(times) > budget_s and len(times) >= MIN_REPEATS or sum(times) > 3 * budget_s:
            break
    times_ms = [t * 1e3 for t in times]
    return {"warmup_s": warmup_s, "times_ms": times_ms, "median_ms": statistics.median(times_ms),
            "repeats": len(times_ms)}



def timed_case(case, ours, ours_call, peer, peer_call, peer_sync, repeats, budget_s):
    """Fill case with ours' and the peer's timings, each compiled / warmed by a first call of its own."""
    if ours.first_call_s is None:
        guarded("ours first call", ours_call)
    case["ours_timing"] = guarded("ours", lambda: measure(ours_call, jax_sync, repeats, budget_s))
    case["ours_timing"]["first_call_s"] = ours.first_call_s
    if peer_call is not None:
        case["peer_timing"] = guarded("peer", lambda: measure(peer_call, peer_sync, repeats, budget_s))
        case["peer_timing"]["first_call_s"] = peer.first_call_s
    return case


# ---------------------------------------------------------------- gated delta rule


def l2norm(x):
    """x / sqrt(sum x^2 + 1e-6) over the last axis, as transformers' l2norm (numpy float32)."""
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def kernel_inputs(shape, seed=0):
    """(B, T, H, D) -> float32 numpy dict: raw q, k (torch), normalised + scaled q, k (ours), v, g, beta, cot."""
    b, t, h, d = shape
    rng = np.random.default_rng(seed)
    q, k, v, cot = (rng.standard_normal((b, t, h, d), np.float32) for _ in range(4))
    g = -np.log1p(np.exp(-rng.standard_normal((b, t, h)))).astype(np.float32)  # logsigmoid: decay in (0, 1)
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, h))))).astype(np.float32)
    return {"q_raw": q, "k_raw": k, "q": l2norm(q) * d**-0.5, "k": l2norm(k), "v": v, "g": g, "beta": beta,
            "cot": cot}


def ours_kernel_fns(method):
    """method -> (forward, grad wrt q, k, v, g, beta of sum(o * cot)), both jitted and FirstCall-timed."""
    rule = {
        "recurrent": recurrent_gated_delta_rule,
        "chunked-sequential": lambda *a: chunked_gated_delta_rule(*a, scan="sequential"),
        "chunked-associative": lambda *a: chunked_gated_delta_rule(*a, scan="associative"),
    }[method]

    def forward(q, k, v, g, beta):
        return rule(q, k, v, g, beta)[0]

    def loss(q, k, v, g, beta, cot):
        return jnp.sum(forward(q, k, v, g, beta).astype(jnp.float32) * cot)

    return (FirstCall(jax.jit(forward), jax_sync),
            FirstCall(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), jax_sync))


def torch_kernel_fns(rule, sync):
    """HF torch rule -> (forward, grad wrt raw q, k and v, g, beta of sum(o * cot)); q, k l2-normed inside."""

    def forward(q, k, v, g, beta):
        with torch.no_grad():
            return rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    def grad(q, k, v, g, beta, cot):
        inputs = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
        o = rule(*inputs, use_qk_l2norm_in_kernel=True)[0]
        return torch.autograd.grad((o.float() * cot).sum(), inputs)

    return FirstCall(forward, sync), FirstCall(grad, sync)


def max_diff(a, b):
    """max |a - b| in float64 over jax, numpy or torch arrays."""
    a, b = (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
            for x in (a, b))
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def torch_too_slow(method, mode, shape):
    """Why a torch case is not run, or None: its recurrent backward grows about as T^2."""
    batch, seq_len = shape[:2]
    # Autograd through the per-token loop: every in-place write of one token's output adds a node whose
    # backward (we believe) copies the whole output buffer. On 2 CPU cores B1 T1024 took ~1 s a call and
    # B2 T2048 over 30 s, which would blow this script's few-minute budget.
    if method == "recurrent" and mode == "fwd+bwd" and batch * seq_len > RECURRENT_BWD_MAX_TOKENS:
        return f"torch recurrent fwd+bwd is skipped beyond B*T = {RECURRENT_BWD_MAX_TOKENS} tokens (~T^2 backward)"
    return None


def bench_kernels(report, shapes, jax_dtype, torch_device, repeats, budget_s):
    """Every (shape, mode, method) of the delta rule: a sanity check, then ours and torch's timings."""
    torch_dtype = torch.bfloat16 if jax_dtype == jnp.bfloat16 else torch.float32
    # Outputs come back in the input dtype; bf16 keeps ~3 significant digits of values of order 1-10.
    tolerance = 1e-4 if jax_dtype == jnp.float32 else 1e-1
    for shape in shapes:
        x = kernel_inputs(shape)
        # g stays float32 as in the model (and the fla peer); the rest take the benchmark dtype.
        ours_in = [jnp.asarray(x[n], jnp.float32 if n == "g" else jax_dtype) for n in ("q", "k", "v", "g", "beta")]
        cot_j = jnp.asarray(x["cot"])
        label = "B{} T{} H{} D{}".format(*shape)
        print(f"delta rule {label}", flush=True)
        ours = {m: ours_kernel_fns(m) for m in OURS_METHODS}
        peers = {}
        if torch_device is not None:
            torch_in = [torch.tensor(x[n], device=torch_device, dtype=torch.float32 if n == "g" else torch_dtype)
                        for n in ("q_raw", "k_raw", "v", "g", "beta")]
            cot_t = torch.tensor(x["cot"], device=torch_device)
            sync = torch_sync_for(torch_device)
            peers = {"chunked": torch_kernel_fns(TORCH_CHUNK, sync),
                     "recurrent": torch_kernel_fns(TORCH_RECURRENT, sync)}

        # Sanity before timing (these calls also compile): every output against torch's chunked form.
        report.arm(f"sanity {label}")
        check = {"shape": label, "reference": "torch chunked" if peers else "ours chunked-sequential"}
        reference = peers["chunked"][0](*torch_in) if peers else ours["chunked-sequential"][0](*ours_in)
        for method, (fwd, _) in ours.items():
            check[f"ours {method} vs reference"] = guarded(method, lambda: max_diff(fwd(*ours_in), reference))
        if peers:
            check["torch recurrent vs torch chunked"] = guarded(
                "torch recurrent", lambda: max_diff(peers["recurrent"][0](*torch_in), reference))
            # Gradients wrt v, g and beta mean the same on both sides (q, k do not: raw vs normalised).
            ours_grads = ours["chunked-sequential"][1](*ours_in, cot_j)
            torch_grads = peers["chunked"][1](*torch_in, cot_t)
            for i, n in ((2, "v"), (3, "g"), (4, "beta")):
                check[f"grad {n}: ours chunked-sequential vs torch chunked"] = max_diff(ours_grads[i], torch_grads[i])
        # The verdict is on the outputs; the gradient diffs are there to read (they grow with T).
        diffs = [v for k, v in check.items() if k.startswith("ours") and isinstance(v, float)]
        check["tolerance"] = tolerance
        check["agree"] = len(diffs) == len(ours) and max(diffs) <= tolerance
        report.sanity.append(check)
        print("  sanity " + json.dumps(check), flush=True)
        if not check["agree"]:
            print("  WARNING: outputs disagree beyond tolerance; the timings compare different results", flush=True)

        for mode in ("fwd", "fwd+bwd"):
            for method in OURS_METHODS:
                peer_name = TORCH_PEER[method]
                case = {"kind": "delta_rule", "shape": label, "mode": mode, "ours": method,
                        "peer": f"torch {peer_name}" if peers else None, "peer_timing": None}
                report.arm(f"{label} {mode} {method}")
                index = 0 if mode == "fwd" else 1
                ours_fn = ours[method][index]
                ours_args = ours_in if mode == "fwd" else ours_in + [cot_j]
                peer_fn = peer_call = None
                # The torch peer is timed once per (shape, mode, peer); later rows share its figures.
                shared = next((c for c in report.cases if c["peer"] == case["peer"] and
                               (c["shape"], c["mode"]) == (label, mode)), None)
                if shared is not None:
                    case["peer_timing"] = shared["peer_timing"]
                elif peers:
                    skip = torch_too_slow(method, mode, shape)
                    if skip:
                        case["peer_timing"] = {"skipped": skip}
                    else:
                        peer_fn = peers[peer_name][index]
                        peer_args = torch_in if mode == "fwd" else torch_in + [cot_t]
                        peer_call = lambda: peer_fn(*peer_args)  # noqa: E731
                timed_case(case, ours_fn, lambda: ours_fn(*ours_args), peer_fn, peer_call,
                           peers and sync, repeats, budget_s)
                report.add(case)


# ---------------------------------------------------------------- tiny model


def bench_model(report, torch_device, repeats, budget_s):
    """The tiny preset with random weights shared via save_hf: forward and forward+backward, ours vs HF eager."""
    report.arm("tiny model: build both and share the weights")
    config = qwen_jax.preset("tiny")
    model = qwen_jax.Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    hf_model = None
    if torch_device is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)  # the same weights on both sides, so the logits can be checked too
            hf_model = transformers.Qwen3_5ForCausalLM.from_pretrained(
                tmp, attn_implementation="eager", dtype=torch.float32).to(torch_device).eval()
        params = [p for p in hf_model.parameters() if p.requires_grad]
        sync = torch_sync_for(torch_device)

    @nnx.jit
    def forward(model, ids):
        return model(ids).logits

    @nnx.jit
    def loss_and_grads(model, ids, labels):
        def loss_fn(model):
            logits = model(ids).logits.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return nnx.value_and_grad(loss_fn)(model)

    def hf_forward(ids):
        with torch.no_grad():
            return hf_model(input_ids=ids, use_cache=False).logits

    def hf_loss_and_grads(ids, labels):
        logits = hf_model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return loss, torch.autograd.grad(loss, params)

    for batch, seq in MODEL_SHAPES:
        label = f"tiny B{batch} T{seq}"
        print(f"model {label}", flush=True)
        rng = np.random.default_rng(1)
        ids_np = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int32)
        labels_np = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int32)
        ids, labels = jnp.asarray(ids_np), jnp.asarray(labels_np)
        # Fresh wrappers per shape: every shape compiles anew, and its first call is its own.
        ours = {"fwd": FirstCall(lambda: forward(model, ids), jax_sync),
                "fwd+bwd": FirstCall(lambda: loss_and_grads(model, ids, labels), jax_sync)}
        report.arm(f"sanity {label}")
        if hf_model is not None:
            ids_t = torch.tensor(ids_np, dtype=torch.long, device=torch_device)
            labels_t = torch.tensor(labels_np, dtype=torch.long, device=torch_device)
            peers = {"fwd": FirstCall(lambda: hf_forward(ids_t), sync),
                     "fwd+bwd": FirstCall(lambda: hf_loss_and_grads(ids_t, labels_t), sync)}
            check = {"shape": label, "logits ours vs torch": max_diff(ours["fwd"](), peers["fwd"]()),
                     "loss ours vs torch": max_diff(ours["fwd+bwd"]()[0], peers["fwd+bwd"]()[0])}
            report.sanity.append(check)
            print("  sanity " + json.dumps(check), flush=True)
        for mode in ("fwd", "fwd+bwd"):
            case = {"kind": "model", "shape": label, "mode": mode, "ours": "nnx.jit",
                    "peer": "transformers eager" if hf_model is not None else None, "peer_timing": None}
            report.arm(f"{label} {mode}")
            peer = peers[mode] if hf_model is not None else None
            timed_case(case, ours[mode], ours[mode], peer, peer, hf_model is not None and sync, repeats, budget_s)
            report.add(case)


# ---------------------------------------------------------------- the GPU peer (fla), in its own process




# ---------------------------------------------------------------- report


def median_text(timing):
    """A timing dict -> (median ms or None, its cell text)."""
    if timing is None:
        return None, "-"
    if "median_ms" in timing:
        return timing["median_ms"], f"{timing['median_ms']:.2f}"
    if "warmup_s" in timing:
        return None, f"skipped (1 call: {timing['warmup_s'] * 1e3:.0f})"
    return None, "skipped" if "skipped" in timing else "error"


def row_cells(case):
    """One case -> markdown cells: case, shape, ours ms, peer ms, peer/ours, first-call seconds of both."""
    ours_ms, ours_text = median_text(case["ours_timing"])
    peer_ms, peer_text = median_text(case["peer_timing"])
    ratio = f"{peer_ms / ours_ms:.2f}" if ours_ms and peer_ms else "-"
    firsts = [(t or {}).get("first_call_s") for t in (case["ours_timing"], case["peer_timing"])]
    first = " / ".join("-" if s is None else f"{s:.2f}" for s in firsts)
    name = f"{case['kind']} {case['mode']}: {case['ours']} vs {case['peer'] or '-'}"
    return [name, case["shape"], ours_text, peer_text, ratio, first]


class Report:
    """Collects meta, sanity checks and cases; rewrites the JSON and markdown after every case."""

    def __init__(self, out, device, meta, hang_s):
        self.slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
        self.out, self.meta, self.hang_s = Path(out), meta, hang_s
        self.cases, self.sanity, self.peer = [], [], None
        self.start = time.perf_counter()

    def arm(self, what):
        """(Re)start the hang guard: if `what` takes hang_s, dump the stacks and exit (the report so far stays)."""
        print(f"  [{time.perf_counter() - self.start:6.1f} s] {what}", flush=True)
        faulthandler.dump_traceback_later(self.hang_s, exit=True)

    def add(self, case):
        self.cases.append(case)
        print("  " + " | ".join(row_cells(case)), flush=True)
        self.save(complete=False)

    def save(self, complete):
        """Write foundation_<device>.json and .md; -> the markdown."""
        self.meta.update(total_s=time.perf_counter() - self.start, complete=complete,
                         loadavg_end=os.getloadavg())
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "sanity": self.sanity, "cases": self.cases, "fla_peer": self.peer}
        (self.out / f"foundation_{self.slug}.json").write_text(json.dumps(data, indent=2) + "\n")
        table = self.markdown()
        (self.out / f"foundation_{self.slug}.md").write_text(table)
        return table

    def markdown(self):
        """The report: a header, the table, the sanity diffs and any fla peer lines."""
        m, v = self.meta, self.meta["versions"]
        head = ["case", "shape", "ours ms", "peer ms", "peer/ours", "first call s (ours / peer)"]
        lines = [f"# Foundation benchmark on {m['device']} ({m['date']})", "",
                 f"jax {v['jax']}, flax {v['flax']}, torch {v['torch']} ({m['torch_threads']} threads), "
                 f"transformers {v['transformers']}; {m['cpu_count']} CPUs; load average "
                 f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; "
                 f"commit {m['git_commit']}; total {m['total_s']:.0f} s{' (--quick)' if m['quick'] else ''}"
                 f"{'' if m['complete'] else ' -- INCOMPLETE'}.", "",
                 f"Median of up to {m['repeats']} timed calls after one warm-up call. peer/ours > 1 means ours "
                 "is faster. Peers are transformers' pure PyTorch paths (the delta-rule peers l2-normalise "
                 "q and k inside; ours take them normalised). First call = compile + run for ours.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row_cells(c)) + " |" for c in self.cases]
        lines += ["", "Sanity checks (max abs diff, before timing):", ""]
        lines += [f"- {json.dumps(s)}" for s in self.sanity]
        if self.peer is not None:
            lines += ["", "fla peer (`peer_torch.py kernel`, run first in its own process):", "", "```"]
            lines += [json.dumps(line) for line in self.peer.get("lines", [])]
            lines += [json.dumps({k: v for k, v in self.peer.items() if k != "lines"}), "```"]
        return "\n".join(lines) + "\n"




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, first kernel shape only")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    args = parser.parse_args()
    loadavg_start = os.getloadavg()

    # Before JAX claims the GPU's memory: the fla peer runs alone, in its own process.
    peer_dir = os.environ.get("QWEN_JAX_PEER_DIR")
    peer = run_peer(peer_dir, "kernel") if peer_dir else None

    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    torch.set_num_threads(os.cpu_count())
    # The torch peers run on the same kind of device as ours, or not at all.
    torch_device = ("cuda" if torch.cuda.is_available() else None) if on_gpu else "cpu"
    repeats, budget_s = (3, 10.0) if args.quick else (7, 20.0)
    shapes = (GPU_KERNEL_SHAPES if on_gpu else CPU_KERNEL_SHAPES)[: 1 if args.quick else None]
    jax_dtype = jnp.bfloat16 if on_gpu else jnp.float32
    meta = {
        "device": device, "backend": jax.default_backend(), "torch_device": torch_device,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "xla_flags": os.environ.get("XLA_FLAGS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "quick": args.quick, "repeats": repeats, "budget_s_per_case": budget_s,
        "kernel_dtype": jnp.dtype(jax_dtype).name, "loadavg_start": loadavg_start,
        "torch_kernels": [f"{f.__module__}.{f.__qualname__}" for f in (TORCH_CHUNK, TORCH_RECURRENT)],
    }
    report = Report(args.out, device, meta, HANG_S["gpu" if on_gpu else "cpu"])
    report.peer = peer
    print(f"device {device}; torch on {torch_device}; {repeats} repeats, {budget_s} s budget per case", flush=True)

    bench_kernels(report, shapes, jax_dtype, torch_device, repeats, budget_s)
    bench_model(report, torch_device, repeats, budget_s)
    faulthandler.cancel_dump_traceback_later()
    table = report.save(complete=True)
    print("\n" + table)
    print(f"wrote {report.out}/foundation_{report.slug}.json and .md in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
