"""Causal, segment-masked attention on TPU through JAX's splash attention kernels (Pallas, Mosaic).

XLA:TPU's attention builds the [B, Hq, T, T] float32 scores and the [B, 1, T, T] segment mask: at the
0.8B shape (8 query heads, T = 4096) that is 512 MiB of scores per row per layer, every layer, in the
forward and again in the backward. Splash attention walks key blocks with an online softmax in VMEM,
skips the blocks above the diagonal (the causal mask is known when the kernel is built), and takes the
segment ids as two int vectors instead of a mask. Its backward recomputes the block scores from the
saved log-sum-exp.

The kernels are JAX's own (`jax.experimental.pallas.ops.tpu.splash_attention`); this module fits them to
our layout: [B, T, H, D] in and out, grouped queries through the multi-query kernel (one key head, its
group of query heads) mapped over key heads and rows. Off TPU they run in the Pallas interpreter, which
is how the tests check them against XLA's attention.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

LANES = 128  # a key block, and the head dim, must fill whole TPU lane tiles


def splash_block(length: int, block: int) -> int:
    """The block size splash uses for a sequence of `length`: `block`, or the whole sequence if shorter."""
    return min(block, length)


def splash_supports(length: int, head_dim: int, block: int) -> str | None:
    """None if the kernels tile this sequence and head dim with `block`, else why not."""
    size = splash_block(length, block)
    if length % size:
        return f"sequence length {length} is not a multiple of the splash block {size}"
    if size % LANES:
        return f"the splash block ({size}) must be a multiple of {LANES}"
    if head_dim % LANES:
        return f"head_dim {head_dim} must be a multiple of {LANES}"
    return None


def _kernel(length: int, group: int, block: int, interpret: bool):
    """The multi-query kernel for `group` query heads over one key head, causal over `length`.

    Built per trace, not cached: it holds the mask's block tables as arrays, which inside a trace are
    that trace's values.
    """
    causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(group)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     scale: float, block: int = 512, interpret: bool = False) -> jax.Array:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D], segment_ids int [B, T] or None -> [B, T, Hq, D] in q's dtype.

    Query i sees key j iff j <= i and (with segment ids) both have one id; padding, id 0, is a segment
    like any other, so its rows stay finite. Query head h reads key head h // (Hq / Hkv).
    """
    batch, length, query_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = query_heads // kv_heads
    problem = splash_supports(length, head_dim, block)
    if problem:  # checked in the interpreter too, so a CPU run takes only what a TPU would
        raise ValueError(f"splash attention: {problem}")
    kernel = _kernel(length, group, splash_block(length, block), interpret)
    # [B, T, Hkv * group, D] -> [B, Hkv, group, T, D]; keys and values [B, Hkv, T, D].
    grouped = (q * scale).reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    keys, values = (x.transpose(0, 2, 1, 3) for x in (k, v))

    def row(q_row, k_row, v_row, ids):
        segments = None if ids is None else splash.SegmentIds(q=ids, kv=ids)
        return jax.vmap(lambda q_head, k_head, v_head: kernel(q_head, k_head, v_head, segment_ids=segments))(
            q_row, k_row, v_row)

    ids = None if segment_ids is None else segment_ids.astype("int32")
    out = jax.vmap(row)(grouped, keys, values, ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
