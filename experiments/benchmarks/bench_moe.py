"""Sparse MoE benchmark: our SparseMoE (ragged and padded dispatch) against transformers' Qwen3_5MoeSparseMoeBlock.

    python experiments/benchmarks/bench_moe.py [--quick] [--wait-quiet S] [--out experiments/results]

Times the whole MoE block and the routed experts alone (our expert_ffn + weighted sum against the
peer's experts module), forward and forward+backward, under even and skewed routing; every side
gets the same random weights and inputs. The peer runs with transformers' "eager" (a loop over
experts) and "grouped_mm" (torch's grouped matmul) experts implementations. On CPU: a scaled-down
fp32 shape (--quick: a smaller one); on a GPU: Qwen3.5-35B-A3B's MoE (32,768 tokens, hidden 2048,
256 experts top-8 of width 512 + a shared expert of 512) in bf16. Writes moe_<device>.json (every
raw timing) and moe_<device>.md (the table) to --out, rewritten after every case.
"""

from __future__ import annotations

import os

# OpenBLAS threads on top of XLA's own thread pool oversubscribe a small CPU (see bench_foundation.py);
# and on a GPU, JAX must not preallocate the memory the torch peer needs in this same process.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 - after the environment above
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import Qwen3_5MoeTextConfig  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock  # noqa: E402

from qwen_jax.config import preset  # noqa: E402
from qwen_jax.model.moe import SparseMoE  # noqa: E402
from qwen_jax.ops.grouped_matmul import expert_capacity, expert_ffn  # noqa: E402

from common import REPO, git_commit, guarded  # noqa: E402

# XLA:CPU runs jax.lax.ragged_dot (our ragged dispatch) at ~1 GFLOP/s with 64 experts, where a batched
# matmul of the same size runs at ~60: the CPU shape is small enough for that path to take seconds a call.
SHAPES = {  # tokens, hidden, experts, top-k, routed expert width, shared expert width
    "cpu": dict(tokens=2048, hidden=256, experts=64, top_k=8, width=64, shared=64),
    "cpu-quick": dict(tokens=1024, hidden=256, experts=16, top_k=4, width=64, shared=64),
    "gpu": dict(tokens=32768, hidden=2048, experts=256, top_k=8, width=512, shared=512),
}
OURS = ("ragged", "padded")  # moe_dispatch values
PEERS = ("eager", "grouped_mm")  # transformers' config._experts_implementation values
# Skewed routing: the router columns of the first top_k / 2 experts are scaled by this, so that they
# take up to ~3x their even share of rows, past the padded path's capacity (1.25x; CPU shape: 11% of rows overflow).
SKEW_SCALE = 4.0
MIN_REPEATS = 3  # a case over its time budget still gets this many timed calls


# ---------------------------------------------------------------- timing


def cpu_seconds():
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far (Linux /proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = os.times()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_load(since, wall_s):
    """Cores kept busy by other processes since `since` (a cpu_seconds()) over wall_s: the noise a timing ran under."""
    now = cpu_seconds()
    return max(0.0, (now[0] - since[0]) - (now[1] - since[1])) / wall_s


def wait_quiet(max_s, threshold=0.3):
    """Wait (up to max_s) until other processes use under `threshold` cores over a 5 s window; -> seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        since = cpu_seconds()
        time.sleep(5)
        if other_load(since, 5) < threshold:
            break
    return time.perf_counter() - start


def measure(fn, sync, repeats, budget_s, quiet_s):
    """fn() timed: a first call (compile + warm-up), then up to `repeats` timed calls, fewer past budget_s."""
    waited_s = wait_quiet(quiet_s) if quiet_s else 0.0
    start = time.perf_counter()
    sync(fn())
    first_call_s = time.perf_counter() - start
    times, since = [], cpu_seconds()
    while len(times) < repeats and (len(times) < MIN_REPEATS or sum(times) < budget_s):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    times_ms = [t * 1e3 for t in times]
    return {"first_call_s": first_call_s, "times_ms": times_ms, "median_ms": statistics.median(times_ms),
            "min_ms": min(times_ms), "repeats": len(times_ms), "waited_quiet_s": waited_s,
            "other_load": other_load(since, sum(times))}


def torch_sync_for(device):
    """A sync function for torch results on `device` (CPU calls are already synchronous)."""
    if device == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: out



def flops(shape, part):
    """Useful forward FLOPs: routed experts (3 H x I matmuls an assignment); the block adds shared expert and router."""
    s = shape
    routed = 2 * s["tokens"] * s["top_k"] * 3 * s["hidden"] * s["width"]
    if part == "experts":
        return routed
    return routed + 2 * s["tokens"] * 3 * s["hidden"] * s["shared"] + 2 * s["tokens"] * s["hidden"] * s["experts"]


# ---------------------------------------------------------------- the two sides


def build_ours(shape, dispatch, dtype, skewed):
    """Our SparseMoE at `shape` (seeded: every dispatch gets the same weights), router skewed if asked."""
    cfg = preset("tiny-moe").replace(
        hidden_size=shape["hidden"], num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
        moe_intermediate_size=shape["width"], shared_expert_intermediate_size=shape["shared"],
        moe_dispatch=dispatch, dtype=dtype, param_dtype=dtype)
    moe = SparseMoE(cfg, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=nnx.Rngs(0))
    if skewed:
        moe.gate.kernel[...] = moe.gate.kernel[...].at[:, : shape["top_k"] // 2].multiply(SKEW_SCALE)
    return moe


def build_peer(shape, impl, moe, device, dtype):
    """transformers' block with `impl` experts, holding our module's weights (HF stores every matrix [out, in])."""
    config = Qwen3_5MoeTextConfig(
        hidden_size=shape["hidden"], num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
        moe_intermediate_size=shape["width"], shared_expert_intermediate_size=shape["shared"], hidden_act="silu")
    config._experts_implementation = impl
    block = Qwen3_5MoeSparseMoeBlock(config)
    weights = {".".join(map(str, path)).replace("kernel", "weight"):
               torch.from_numpy(np.swapaxes(np.asarray(v[...], np.float32), -1, -2).copy())
               for path, v in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    block.load_state_dict(weights, strict=True)
    return block.to(device=device, dtype=dtype)


def ours_fns(moe, part, x, cot, routing):
    """Our jitted (forward, grad of sum(y * cot) wrt x and every weight taking part) for `part`, as 0-argument calls."""
    cfg = moe.config
    if part == "block":
        graphdef, params = nnx.split(moe)
        consts = (jnp.ones(x.shape[:2], bool),)

        def forward(params, x, mask):
            return nnx.merge(graphdef, params)(x, mask)[0]
    else:
        n, k = routing["experts"].shape
        capacity = expert_capacity(n * k, cfg.num_experts, cfg.moe_capacity_factor)
        params = (moe.experts.gate_up_proj[...], moe.experts.down_proj[...])
        consts = (jnp.asarray(routing["experts"]), jnp.asarray(routing["weights"], x.dtype))

        def forward(params, x, experts, weights):
            out = expert_ffn(x.reshape(n, -1), jnp.arange(n * k) // k, experts.reshape(-1), *params,
                             dispatch=cfg.moe_dispatch, capacity=capacity)
            # The peer's experts module returns the routing-weighted sum per token; so does this.
            return jnp.einsum("nk,nkh->nh", weights, out.reshape(n, k, -1)).reshape(x.shape)

    def loss(params, x, cot, *consts):
        return jnp.sum(forward(params, x, *consts).astype(jnp.float32) * cot)

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return (lambda: fwd(params, x, *consts)), (lambda: grad(params, x, cot, *consts))


def peer_fns(block, part, x, cot, routing):
    """The peer's (forward, grad of sum(y * cot) wrt x and every weight taking part) as zero-argument calls."""
    module = block if part == "block" else block.experts
    if part == "block":
        args = ()
    else:  # the experts take [N, H] rows, their top-k ids and weights
        x = x.reshape(-1, x.shape[-1])
        cot = cot.reshape(x.shape)
        args = (torch.tensor(routing["experts"], device=x.device, dtype=torch.long),
                torch.tensor(routing["weights"], device=x.device, dtype=x.dtype))
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        with torch.no_grad():
            return module(x, *args)

    def grad():
        x_ = x.detach().requires_grad_()
        y = module(x_, *args)
        return torch.autograd.grad((y.float() * cot).sum(), [x_, *params])

    return forward, grad


def max_diff(a, b):
    """max |a - b| over jax or torch arrays, in float64."""
    a, b = (np.asarray(t.detach().float().cpu() if isinstance(t, torch.Tensor) else jnp.asarray(t, jnp.float32),
                       np.float64) for t in (a, b))
    return float(np.max(np.abs(a.reshape(b.shape) - b)))


# ---------------------------------------------------------------- the run


def bench_routing(report, shape, skewed, dtype, torch_device, repeats, budget_s, quiet_s):
    """One routing (even or skewed): build every side, check their outputs agree, time every (part, mode, side)."""
    label = "skewed" if skewed else "even"
    print(f"routing {label}", flush=True)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    ours = {d: build_ours(shape, d, dtype, skewed) for d in OURS}
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, shape["tokens"], shape["hidden"]), np.float32)
    cot_np = rng.standard_normal(x_np.shape, np.float32)
    x, cot = jnp.asarray(x_np, dtype), jnp.asarray(cot_np)
    peers, x_t, cot_t = {}, None, None
    if torch_device is not None:
        peers = {impl: build_peer(shape, impl, ours["ragged"], torch_device, torch_dtype) for impl in PEERS}
        x_t = torch.tensor(x_np, device=torch_device, dtype=torch_dtype)
        cot_t = torch.tensor(cot_np, device=torch_device)

    # The routing both experts-only cases take: the router's top-k, computed as the block computes it.
    probs = jax.nn.softmax(ours["ragged"].gate(x).astype(jnp.float32)[0], axis=-1)
    top_probs, experts = jax.lax.top_k(probs, shape["top_k"])
    routing = {"experts": np.asarray(experts), "weights": np.asarray(top_probs / top_probs.sum(-1, keepdims=True))}
    rows = routing["experts"].size
    capacity = expert_capacity(rows, shape["experts"], ours["ragged"].config.moe_capacity_factor)
    load = np.bincount(routing["experts"].ravel(), minlength=shape["experts"])
    check = {"routing": label, "capacity": capacity, "max_load": int(load.max()),
             "overflow_rows_fraction": float(np.maximum(load - capacity, 0).sum() / rows)}

    fns = {}
    for part in ("block", "experts"):
        for d in OURS:
            fns[(part, f"ours {d}")] = ours_fns(ours[d], part, x, cot, routing)
        for impl, block in peers.items():
            fns[(part, f"torch {impl}")] = peer_fns(block, part, x_t, cot_t, routing)
        # Sanity before timing: every side's forward against torch eager's (ours ragged's without torch).
        reference_side = "torch eager" if peers else "ours ragged"
        reference = fns[(part, reference_side)][0]()
        for (p, side), (fwd, _) in fns.items():
            if p == part and side != reference_side:
                check[f"{part} {side} vs {reference_side}"] = guarded(side, lambda: max_diff(fwd(), reference))
    report.sanity.append(check)
    print("  sanity " + json.dumps(check), flush=True)

    for (part, side), (fwd, grad) in fns.items():
        for mode, fn in (("fwd", fwd), ("fwd+bwd", grad)):
            sync = jax.block_until_ready if side.startswith("ours") else torch_sync_for(torch_device)
            case = {"part": part, "routing": label, "mode": mode, "side": side,
                    "flops": flops(shape, part) * (3 if mode == "fwd+bwd" else 1)}
            case["timing"] = guarded(side, lambda: measure(fn, sync, repeats, budget_s, quiet_s))
            report.add(case, shape["tokens"])


# ---------------------------------------------------------------- report


SIDES = ("ours ragged", "ours padded", "torch eager", "torch grouped_mm")


class Report:
    """Collects meta, sanity checks and cases; rewrites the JSON and markdown after every case."""

    def __init__(self, out, device, meta):
        self.slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
        self.out, self.meta = Path(out), meta
        self.cases, self.sanity = [], []
        self.start = time.perf_counter()

    def add(self, case, tokens):
        """Derive tokens/s and TFLOP/s from the median, print the row and save."""
        t = case["timing"]
        if "median_ms" in t:
            t["tokens_per_s"] = tokens / (t["median_ms"] / 1e3)
            t["tflops"] = case["flops"] / (t["median_ms"] / 1e3) / 1e12
        self.cases.append(case)
        print("  " + " | ".join(self.row(case)), flush=True)
        self.save(complete=False)

    def row(self, case):
        """One case -> markdown cells; the ratio cells are peer ms / this ms (> 1: this side is faster)."""
        t = case["timing"]
        head = [case["part"], case["routing"], case["mode"], case["side"]]
        if "median_ms" not in t:
            return head + ["error: " + t["error"][:120].replace("|", "/")] + [""] * 8
        ratios = []
        for peer in PEERS:
            other = next((c["timing"] for c in self.cases if c["side"] == f"torch {peer}" and
                          (c["part"], c["routing"], c["mode"]) == (case["part"], case["routing"], case["mode"])), {})
            ratios.append(f"{other['median_ms'] / t['median_ms']:.2f}" if "median_ms" in other else "-")
        return head + [f"{t['median_ms']:.1f}", f"{t['min_ms']:.1f}", f"{t['tokens_per_s']:,.0f}",
                       f"{t['tflops']:.3g}", f"{t['first_call_s']:.2f}", f"{t['other_load']:.2f}", *ratios]

    def save(self, complete):
        """Write moe_<device>.json and .md; -> the markdown."""
        self.meta.update(total_s=time.perf_counter() - self.start, complete=complete, loadavg_end=os.getloadavg())
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "sanity": self.sanity, "cases": self.cases}
        (self.out / f"moe_{self.slug}.json").write_text(json.dumps(data, indent=2) + "\n")
        table = self.markdown()
        (self.out / f"moe_{self.slug}.md").write_text(table)
        return table

    def markdown(self):
        """The report: a header, the table (rows in SIDES order, ratios filled in) and the sanity checks."""
        m, v, s = self.meta, self.meta["versions"], self.meta["shape"]
        head = ["part", "routing", "mode", "side", "median ms", "min ms", "tokens/s", "useful TFLOP/s",
                "first call s", "other load", "torch eager / this", "torch grouped_mm / this"]
        lines = [f"# Sparse MoE benchmark on {m['device']} ({m['date']})", "",
                 f"jax {v['jax']}, flax {v['flax']}, torch {v['torch']} ({m['torch_threads']} threads, on "
                 f"{m['torch_device']}), transformers {v['transformers']}; {m['cpu_count']} CPUs; load average "
                 f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; commit "
                 f"{m['git_commit']}; total {m['total_s']:.0f} s{' (--quick)' if m['quick'] else ''}"
                 f"{'' if m['complete'] else ' -- INCOMPLETE'}.", "",
                 f"{s['tokens']} tokens, hidden {s['hidden']}, {s['experts']} experts top-{s['top_k']} of width "
                 f"{s['width']}, shared expert {s['shared']}, {m['dtype']} (params and compute, both sides). "
                 f"Median of up to {m['repeats']} timed calls after a first call (compile + warm-up, timed apart); "
                 "other load = cores kept busy by other processes meanwhile (noise). "
                 "Useful TFLOP/s = 2 x tokens x (top_k x 3HI [+ 3H x shared + H x E for the block]) per forward, "
                 "x3 for fwd+bwd, over the median; padding and overflow work do not count. fwd+bwd = grads of "
                 "sum(y * random cotangent) wrt x and every weight taking part. `experts` = the routed experts "
                 "alone with the router's top-k given: our expert_ffn + the weighted sum vs the peer's "
                 "Qwen3_5MoeExperts. Skewed: the router columns of the first top_k/2 experts scaled x"
                 f"{SKEW_SCALE:g}. The last two columns: peer ms / this ms (> 1: this side is faster)."
                 + (" On one CPU device our padded path branches as on accelerators (its overflow pass runs "
                    "only the blocks that hold overflow rows); on several it runs every block on every call "
                    f"(grouped_matmul.cond_or_select). This run had {m['jax_devices']}."
                    if m["backend"] == "cpu" else ""), "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = {side: i for i, side in enumerate(SIDES)}
        cases = sorted(self.cases, key=lambda c: (c["routing"] != "even", c["part"] != "block",
                                                  c["mode"] != "fwd", order[c["side"]]))
        lines += ["| " + " | ".join(self.row(c)) + " |" for c in cases]
        lines += ["", "Routing and sanity checks (forward max abs diff, before timing):", ""]
        lines += [f"- {json.dumps(s)}" for s in self.sanity]
        return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller CPU shape and 3 repeats")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each case, wait up to S s for other processes to leave the CPU")
    args = parser.parse_args()
    loadavg_start = os.getloadavg()

    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    torch.set_num_threads(os.cpu_count())
    # The torch peers run on the same kind of device as ours, or not at all.
    torch_device = ("cuda" if torch.cuda.is_available() else None) if on_gpu else "cpu"
    shape = SHAPES["gpu" if on_gpu else "cpu-quick" if args.quick else "cpu"]
    dtype = "bfloat16" if on_gpu else "float32"
    repeats, budget_s = (3, 10.0) if args.quick else (7, 15.0)
    meta = {
        "device": device, "backend": jax.default_backend(), "jax_devices": jax.device_count(),
        "torch_device": torch_device,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "quick": args.quick, "repeats": repeats, "budget_s_per_case": budget_s,
        "wait_quiet_s": args.wait_quiet, "shape": shape, "dtype": dtype, "skew_scale": SKEW_SCALE,
        "loadavg_start": loadavg_start,
    }
    report = Report(args.out, device, meta)
    print(f"device {device}; torch on {torch_device}; shape {shape}, {dtype}", flush=True)
    for skewed in (False, True):
        bench_routing(report, shape, skewed, dtype, torch_device, repeats, budget_s, args.wait_quiet)
    table = report.save(complete=True)
    print("\n" + table)
    print(f"wrote {report.out}/moe_{report.slug}.json and .md in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
