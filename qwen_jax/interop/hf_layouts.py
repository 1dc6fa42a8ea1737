"""Checkpoint layouts that differ from our canonical HF names (Qwen3.5's split GDN projections and
fused `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`).

- Per-expert keys `mlp.experts.<e>.{gate,up,down}_proj.weight` (what transformers saves, and what
  Qwen3-Next and FP8 releases ship) are pieces of the fused tensors.
- Qwen3-Next fuses the GDN input projections per key-head group (spec section 7):
  `in_proj_qkvz` rows per group g are [q_g (dk); k_g (dk); v_g (r dv); z_g (r dv)] with r = Hv / Hk,
  and `in_proj_ba` rows per group are [b_g (r); a_g (r)].
All arrays here are in HF's layout ([out, in] for Linear weights).
"""

from __future__ import annotations

import re

import numpy as np

from qwen_jax.config import ModelConfig

PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def per_expert_piece(name: str) -> tuple[str, int, str] | None:
    """'…mlp.experts.3.up_proj.weight' -> ('…mlp.experts.gate_up_proj', 3, 'up'); None otherwise."""
    match = PER_EXPERT.match(name)
    if match is None:
        return None
    fused = "down_proj" if match["proj"] == "down" else "gate_up_proj"
    return f"{match['prefix']}.{fused}", int(match["expert"]), match["proj"]


def split_experts(name: str, fused: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A fused experts tensor -> the per-expert tensors transformers writes."""
    prefix = name.rsplit(".", 1)[0]
    if name.endswith("gate_up_proj"):
        gate, up = np.split(fused, 2, axis=1)
        return [item for e in range(fused.shape[0]) for item in (
            (f"{prefix}.{e}.gate_proj.weight", gate[e]), (f"{prefix}.{e}.up_proj.weight", up[e]))]
    return [(f"{prefix}.{e}.down_proj.weight", fused[e]) for e in range(fused.shape[0])]


def _group_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    ratio = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    return cfg.linear_key_head_dim, ratio * cfg.linear_value_head_dim, ratio


def split_qkvz(qkvz: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-Next in_proj_qkvz [Hk (2dk + 2r dv), H] -> (in_proj_qkv, in_proj_z) of Qwen3.5."""
    dk, rdv, _ = _group_sizes(cfg)
    groups = qkvz.reshape(cfg.linear_num_key_heads, 2 * dk + 2 * rdv, -1)
    q, k, v, z = np.split(groups, [dk, 2 * dk, 2 * dk + rdv], axis=1)
    flat = lambda x: x.reshape(-1, qkvz.shape[-1])
    return np.concatenate([flat(q), flat(k), flat(v)]), flat(z)


def fuse_qkvz(qkv: np.ndarray, z: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Inverse of split_qkvz."""
    dk, rdv, _ = _group_sizes(cfg)
    hk, width = cfg.linear_num_key_heads, qkv.shape[-1]
    q, k, v = np.split(qkv, [hk * dk, 2 * hk * dk])
    parts = [x.reshape(hk, -1, width) for x in (q, k, v, z)]
    return np.concatenate(parts, axis=1).reshape(-1, width)


def split_ba(ba: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-Next in_proj_ba [Hk 2r, H] -> (in_proj_b, in_proj_a), each [Hv, H]."""
    _, _, ratio = _group_sizes(cfg)
    groups = ba.reshape(cfg.linear_num_key_heads, 2 * ratio, -1)
    return groups[:, :ratio].reshape(-1, ba.shape[-1]), groups[:, ratio:].reshape(-1, ba.shape[-1])


def fuse_ba(b: np.ndarray, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Inverse of split_ba."""
    hk, width = cfg.linear_num_key_heads, b.shape[-1]
    return np.concatenate([b.reshape(hk, -1, width), a.reshape(hk, -1, width)], axis=1).reshape(-1, width)


NEXT_FUSED = {"in_proj_qkvz": ("in_proj_qkv", "in_proj_z", split_qkvz),
              "in_proj_ba": ("in_proj_b", "in_proj_a", split_ba)}
NEXT_FUSED_NAME = re.compile(r"^(?P<prefix>.*\.linear_attn)\.(?P<fused>in_proj_qkvz|in_proj_ba)\.weight$")


def next_fused_rows(name: str, cfg: ModelConfig) -> int | None:
    """Rows of Qwen3-Next's fused GDN projection `name`; None if `name` is not one."""
    match = NEXT_FUSED_NAME.match(name)
    if match is None:
        return None
    if match["fused"] == "in_proj_qkvz":
        return 2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim
    return 2 * cfg.linear_num_value_heads


def split_next_projection(name: str, tensor: np.ndarray, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """'…linear_attn.in_proj_qkvz.weight' -> the two Qwen3.5 tensors it holds."""
    match = NEXT_FUSED_NAME.match(name)
    first, second, split = NEXT_FUSED[match["fused"]]
    x, y = split(tensor, cfg)
    return [(f"{match['prefix']}.{first}.weight", x), (f"{match['prefix']}.{second}.weight", y)]
