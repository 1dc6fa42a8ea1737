"""FLOPs per token (perf-anchors 6.1), device peak FLOP/s for MFU, and the metric sinks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from qwen_jax.config import FULL_ATTENTION, ModelConfig

# Dense bf16 peak FLOP/s per chip. CPU has no meaningful bf16 peak: a nominal 1e11 per process
# (about 2 cores x 3 GHz x 16 fp32 FLOP/cycle) so the figure is comparable run to run.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "cpu": 1e11,
}


def matmul_weights(cfg: ModelConfig) -> int:
    """Matmul weights a token meets, incl. the LM head (a tied embedding counts once, as the head);
    no norms, no conv. MoE: the router, the top-k routed experts and the shared expert."""
    h = cfg.hidden_size
    attention = h * cfg.num_attention_heads * cfg.head_dim * 2 + 2 * h * cfg.num_key_value_heads * cfg.head_dim \
        + cfg.num_attention_heads * cfg.head_dim * h
    gdn = h * cfg.conv_dim + h * cfg.linear_value_dim + 2 * h * cfg.linear_num_value_heads \
        + cfg.linear_value_dim * h
    mlp = 3 * h * cfg.intermediate_size
    if cfg.is_moe:
        mlp = h * cfg.num_experts + 3 * h * (
            cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size)
    full = sum(t == FULL_ATTENTION for t in cfg.layer_types)
    layers = full * attention + (cfg.num_hidden_layers - full) * gdn + cfg.num_hidden_layers * mlp
    return layers + h * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N_w + 6 T Hq dh per attention layer (causal) + 24 Hv dk dv per GDN layer."""
    full = sum(t == FULL_ATTENTION for t in cfg.layer_types)
    attention = 6 * seq_len * cfg.num_attention_heads * cfg.head_dim * full
    gdn = 24 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim \
        * (cfg.num_hidden_layers - full)
    return 6 * matmul_weights(cfg) + attention + gdn


def peak_flops(device: jax.Device | None = None) -> float:
    """Peak bf16 FLOP/s of one device (by device kind), summed over all devices of the run."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    per_device = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    if per_device is None:
        per_device = PEAK_FLOPS["cpu"] if device.platform == "cpu" else math.nan
    count = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return per_device * count


class JsonlWriter:
    """WORKDIR/metrics.jsonl, one object per step; on resume rows past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in _finished_lines(self.path) if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _finished_lines(path: Path) -> list[str]:
    """The non-blank lines of a metrics.jsonl that end in a newline: text after the last one is a row still
    being written, or cut off by a kill, and is not a row yet."""
    return [line for line in Path(path).read_text().split("\n")[:-1] if line.strip()]


def read_metrics(path: Path) -> list[dict]:
    """All rows of a metrics.jsonl (a last row without its newline is not finished: left out)."""
    return [json.loads(line) for line in _finished_lines(path)]


def plot_curve(rows: list[dict], key: str, path: Path, title: str) -> None:
    """A PNG of metric `key` against step (and held-out loss if present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
        ax.plot(*zip(*points), label=key)
    held = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if held:
        ax.plot(*zip(*held), "o-", label="eval/loss")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
