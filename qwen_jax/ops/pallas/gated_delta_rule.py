"""The chunked gated delta rule in Pallas kernels: Triton on GPU, Mosaic on TPU, interpreted elsewhere.

Two kernels on each: one computes the chunk-local terms chunk-parallel (ops/pallas/chunk_terms.py, with the
l2norm and scale of q and k inside), one walks the chunk-to-chunk recurrence; on GPU the terms are XLA's by
default, which is faster there (FUSED_TERMS). Same interface and results as
ops.delta_rule.chunked_gated_delta_rule, which stays the oracle. `platform` picks the kernels ("gpu" or
"tpu"; default: the target's, the GPU ones off TPU); they are compiled only on their own platform.
"""

from __future__ import annotations

import jax.numpy as jnp

from qwen_jax.ops.delta_rule import ChunkTerms, all_bf16, check_inputs, chunk_terms, start_state
from qwen_jax.ops.pallas import chunk_recurrence_tpu as tpu
from qwen_jax.ops.pallas.chunk_recurrence import BLOCK_V, chunk_recurrence
from qwen_jax.ops.pallas.chunk_terms import fused_chunk_terms
from qwen_jax.parallel.rules import target_platform

PLATFORMS = ("gpu", "tpu")
# Whether the chunk-local terms come from the fused kernel (else from XLA, ops.delta_rule.chunk_terms) by
# default. On an H100 (2026-11-25, B4 T4096 H16 D128, bf16) the whole rule with the fused Triton terms kernel
# took 11.2 / 43.7 ms forward / forward+backward, with XLA's terms 1.65 / 5.33
# (experiments/results/accelerator_gpu*.md). Not profiled; a likely cause: its inverse and the products with it
# are float32 dots, which Triton runs without bf16 tensor cores, and the backward recomputes them all.
# TPU: unmeasured; the Mosaic kernel stays the default there.
FUSED_TERMS = {"gpu": False, "tpu": True}


def _tileable(n: int) -> bool:
    """A power of two of at least 16: what Triton's loads and dots take."""
    return n >= 16 and n & (n - 1) == 0


def kernel_platform(platform: str | None = None) -> str:
    """The kernels for `platform` (default: the target's): Mosaic on TPU, else the Triton kernels."""
    platform = platform or ("tpu" if target_platform() == "tpu" else "gpu")
    if platform not in PLATFORMS:
        raise ValueError(f"the Pallas gated delta rule has kernels for {PLATFORMS}, not {platform!r}")
    return platform


def default_block_v(value_dim: int, platform: str) -> int:
    """Value channels per program: 64 on GPU (registers); on TPU the 128-lane width where it divides
    value_dim, else all of it (a block of whole lanes or the whole dim is what Mosaic takes)."""
    if platform == "tpu":
        return tpu.BLOCK_V if value_dim % tpu.BLOCK_V == 0 else value_dim
    return min(BLOCK_V, value_dim)


def check_kernel_shapes(key_dim: int, value_dim: int, chunk_size: int, block_v: int,
                        platform: str = "gpu") -> None:
    """Raise ValueError unless the platform's kernels can tile these. Triton: powers of two >= 16 (the terms
    kernel holds a whole value head); Mosaic: chunks a multiple of 8 rows, value blocks of whole 128-lane
    tiles (or all of dv)."""
    if platform == "tpu":
        if chunk_size % 8:
            raise ValueError(f"the TPU gated delta rule kernel needs chunk_size to be a multiple of 8; "
                             f"got {chunk_size}")
        if block_v != value_dim and block_v % 128:
            raise ValueError(f"the TPU gated delta rule kernel needs block_v to be a multiple of 128 or "
                             f"the value head dim ({value_dim}); got {block_v}")
    else:
        for name, size in (("key head dim", key_dim), ("value head dim", value_dim), ("chunk_size", chunk_size),
                           ("block_v", block_v)):
            if not _tileable(size):
                raise ValueError(f"the Pallas gated delta rule needs {name} to be a power of two >= 16; "
                                 f"got {size}")
    if value_dim % block_v:
        raise ValueError(f"the Pallas gated delta rule needs the value head dim ({value_dim}) to be a "
                         f"multiple of block_v ({block_v})")


def pallas_gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, chunk_size=64,
                            normalize_qk=False, scale=None, block_v=None, interpret=None, platform=None,
                            fused_terms=None):
    """q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H] -> o [B,T,H,dv] (v's dtype), state [B,H,dk,dv] f32.

    Matmul operands are bf16 when q, k and v all are, else float32. normalize_qk as in
    ops.delta_rule.gated_delta_rule. interpret None: compiled on the kernels' own platform only. fused_terms:
    see pallas_chunk_terms.
    """
    check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    seq_len = q.shape[1]
    operand = jnp.bfloat16 if all_bf16(q, k, v) else jnp.float32
    terms = pallas_chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, normalize_qk=normalize_qk, scale=scale,
                               interpret=interpret, platform=platform, fused=fused_terms)
    o, final = pallas_rule_from_terms(terms, start_state(initial_state, q, v), operand=operand, block_v=block_v,
                                      interpret=interpret, platform=platform)
    return o[:, :seq_len].astype(v.dtype), final


def pallas_chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, *, normalize_qk=False, scale=None,
                       interpret=None, platform=None, fused=None) -> ChunkTerms:
    """ops.delta_rule.chunk_terms, through the platform's fused kernel (ops/pallas/chunk_terms.py) when fused
    (default: FUSED_TERMS[platform]), else XLA's."""
    platform = kernel_platform(platform)
    if not (FUSED_TERMS[platform] if fused is None else fused):
        return chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, normalize_qk=normalize_qk, scale=scale)
    value_dim = v.shape[-1]
    check_kernel_shapes(q.shape[-1], value_dim, chunk_size, default_block_v(value_dim, platform), platform)
    interpret = target_platform() != platform if interpret is None else interpret
    return fused_chunk_terms(q, k, v, g, beta, segment_ids, chunk_size, normalize=normalize_qk, scale=scale,
                             platform=platform, interpret=interpret)


def pallas_rule_from_terms(terms: ChunkTerms, state0, *, operand, block_v=None, interpret=None,
                           platform=None):
    """ops.delta_rule.rule_from_terms through the kernel: -> o [B, N*C, H, dv] (operand dtype), final state."""
    batch, heads, _, chunk_size, key_dim = terms.w.shape
    value_dim = terms.u.shape[-1]
    rows = batch * heads
    platform = kernel_platform(platform)
    block_v = default_block_v(value_dim, platform) if block_v is None else block_v
    check_kernel_shapes(key_dim, value_dim, chunk_size, block_v, platform)
    if interpret is None:
        interpret = target_platform() != platform
    recurrence = tpu.chunk_recurrence_tpu if platform == "tpu" else chunk_recurrence

    def flat(x):
        """[B, H, N, C, X] -> [B*H, N*C, X] in the operand dtype (a free reshape)."""
        return x.reshape(rows, -1, x.shape[-1]).astype(operand)

    o, final = recurrence(
        flat(terms.q_decayed), flat(terms.qk_decayed), flat(terms.w), flat(terms.u), flat(terms.k_to_end),
        terms.state_decay.reshape(rows, -1), state0.reshape(rows, key_dim, value_dim), chunk_size, block_v,
        interpret)
    o = jnp.moveaxis(o.reshape(batch, heads, -1, value_dim), 1, 2)
    return o, final.reshape(batch, heads, key_dim, value_dim)
