"""Dropless routed-expert SwiGLU: rows sorted by expert, then a grouped matmul.

Two dispatches give the same numbers (tests/test_moe.py):
- "ragged": one `jax.lax.ragged_dot` per projection. Simple, exact, the oracle; but XLA lowers it
  slowly on GPU (~10 TFLOP/s on an H100 vs ~500 for a batched matmul, research/perf-anchors 7.1).
- "padded": every expert gets a buffer of `capacity` rows and the projections run as one batched
  matmul over [E, capacity, H]. Rows past an expert's capacity are not dropped: a block-by-block pass
  over just those rows runs under `lax.cond`, so it costs nothing when no expert overflows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwen_jax.config import MOE_DISPATCHES
from qwen_jax.parallel.rules import active_mesh, target_platform


def cond_or_select(pred: jax.Array, true_fn, false_fn, *operands):
    """`lax.cond`, except on several CPU devices: there both branches run and the result is selected.

    XLA:CPU's runtime deadlocks when a conditional runs among collectives on several host devices
    (seen with jax 0.10.2: all-to-all and all-reduce rendezvous never complete), so the CPU test
    meshes take the select; one CPU device has no collectives to wait on, and GPUs and TPUs skip the
    untaken branch's work. The devices are the active mesh's (a TPU compile check traces on a CPU
    host), else all of this backend's.
    """
    mesh = active_mesh()
    devices = jax.device_count() if mesh is None else mesh.size
    if target_platform() != "cpu" or devices == 1:
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(*operands), false_fn(*operands))


def expert_capacity(rows: int, num_experts: int, factor: float, multiple: int = 8) -> int:
    """Buffer rows per expert: `factor` x the even share of `rows`, rounded up, at most `rows`."""
    even_share = math.ceil(factor * rows / num_experts)
    return max(1, min(rows, -(-even_share // multiple) * multiple))


def expert_ffn(x: jax.Array, token_index: jax.Array, expert_index: jax.Array, gate_up: jax.Array,
               down: jax.Array, *, dispatch: str, capacity: int) -> jax.Array:
    """SwiGLU_e(x[t]) for every assignment (t, e); expert_index == E marks an empty slot (output 0).

    x [N, H]; token_index, expert_index int32 [A]; gate_up [E, H, 2I] (gate columns first);
    down [E, I, H] -> [A, H] in x's dtype.
    """
    if dispatch not in MOE_DISPATCHES:
        raise ValueError(f"moe dispatch {dispatch!r}; choose one of {MOE_DISPATCHES}")
    num_experts = gate_up.shape[0]
    gate_up, down = gate_up.astype(x.dtype), down.astype(x.dtype)
    order = jnp.argsort(expert_index, stable=True)
    sorted_experts = expert_index[order]
    rows = x[token_index[order]]
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[expert_index].add(1, mode="drop")
    if dispatch == "ragged":
        out = _ragged_swiglu(rows, group_sizes, gate_up, down)
    else:
        out = _padded_swiglu(rows, sorted_experts, group_sizes, gate_up, down, capacity)
    return out[jnp.argsort(order)]


def _swiglu(h: jax.Array) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _ragged_swiglu(rows, group_sizes, gate_up, down):
    """rows [A, H] sorted by expert -> [A, H]; rows past sum(group_sizes) come out 0."""
    hidden = _swiglu(jax.lax.ragged_dot(rows, gate_up, group_sizes))
    return jax.lax.ragged_dot(hidden, down, group_sizes)


def _padded_swiglu(rows, sorted_experts, group_sizes, gate_up, down, capacity):
    """Capacity-padded batched matmul; rows past an expert's capacity go through the ragged path."""
    num_experts = gate_up.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    slot = jnp.arange(rows.shape[0]) - starts[jnp.minimum(sorted_experts, num_experts - 1)]
    valid = sorted_experts < num_experts
    kept = valid & (slot < capacity)
    # Out-of-range indices mark rows that do not go to the buffer ("drop" on write, 0 on read).
    buffer_expert = jnp.where(kept, sorted_experts, num_experts)
    buffers = jnp.zeros((num_experts, capacity, rows.shape[1]), rows.dtype)
    buffers = buffers.at[buffer_expert, slot].set(rows, mode="drop")
    hidden = _swiglu(jnp.einsum("ech,ehf->ecf", buffers, gate_up))
    out = jnp.einsum("eci,eih->ech", hidden, down)
    out = out.at[buffer_expert, slot].get(mode="fill", fill_value=0)
    overflow = valid & ~kept

    def overflow_pass(out):
        return out + _blocked_swiglu(rows, sorted_experts, overflow, gate_up, down)

    return cond_or_select(jnp.any(overflow), overflow_pass, lambda out: out, out)


def _blocked_swiglu(rows, sorted_experts, take, gate_up, down):
    """SwiGLU of the rows where `take` ([A, H] sorted by expert; other rows come out 0).

    Each expert's taken rows are packed from the start of a fresh block and a scan runs block by
    block with that block's expert weights, so the work is about (taken + E x block) rows of matmul
    however skewed the routing, where XLA's ragged_dot may compute every row against every expert.
    """
    num_experts, total = gate_up.shape[0], rows.shape[0]
    block = int(min(128, max(8, 2 ** math.ceil(math.log2(max(1, total // num_experts))))))
    num_blocks = total // block + num_experts  # enough for any split of A rows over E experts
    expert = jnp.minimum(sorted_experts, num_experts - 1)
    taken = jnp.zeros(num_experts, jnp.int32).at[sorted_experts].add(take.astype(jnp.int32), mode="drop")
    blocks = (taken + block - 1) // block
    taken_before = jnp.cumsum(taken) - taken
    rank = jnp.cumsum(take) - take - taken_before[expert]
    position = jnp.where(take, (jnp.cumsum(blocks) - blocks)[expert] * block + rank, num_blocks * block)
    packed = jnp.zeros((num_blocks * block, rows.shape[1]), rows.dtype).at[position].set(rows, mode="drop")
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks), jnp.arange(num_blocks), side="right"),
                               num_experts - 1)
    # Inside shard_map the weights may vary over fewer mesh axes than the rows (data x expert); a zero of
    # the rows' type makes them vary alike, so the custom VJP's types match and autodiff sums their
    # gradient over the other axes.
    gate_up, down = (w + jnp.zeros_like(packed.ravel()[0], w.dtype) for w in (gate_up, down))
    out = _swiglu_per_block(packed.reshape(num_blocks, block, -1), block_expert, jnp.sum(blocks), gate_up, down)
    return out.reshape(num_blocks * block, -1).at[position].get(mode="fill", fill_value=0)


def _expert_swiglu(x, gate_up_e, down_e):
    """One block of rows [b, H] through one expert's weights [H, 2I], [I, H] -> [b, H]."""
    return _swiglu(x @ gate_up_e) @ down_e


@jax.custom_vjp
def _swiglu_per_block(blocks, block_expert, used_blocks, gate_up, down):
    """blocks [N, b, H], each through its expert (block_expert int [N]) -> [N, b, H]; blocks from
    `used_blocks` on hold no rows and come out 0. On accelerators they cost a skipped branch, so the
    pass scales with the overflow, not with the static bound N."""
    def one_block(_, inputs):
        x, e, index = inputs
        return None, cond_or_select(index < used_blocks, lambda x: _expert_swiglu(x, gate_up[e], down[e]),
                                    jnp.zeros_like, x)

    return jax.lax.scan(one_block, None, (blocks, block_expert, jnp.arange(blocks.shape[0])))[1]


def _swiglu_per_block_forward(blocks, block_expert, used_blocks, gate_up, down):
    return _swiglu_per_block(blocks, block_expert, used_blocks, gate_up, down), (
        blocks, block_expert, used_blocks, gate_up, down)


def _swiglu_per_block_backward(residuals, d_out):
    # A scan of its own, recomputing each block: autodiff would keep every block's slices of the
    # expert weights (N x both matrices; under lax.cond on TPU even whole copies), which took the
    # 35B-A3B on v5p-64 from 66 to 168 GiB of temporaries. The weight gradients accumulate in float32.
    blocks, block_expert, used_blocks, gate_up, down = residuals

    def one_block(grads, inputs):
        x, e, index, d = inputs

        def backward(grads):
            _, vjp = jax.vjp(_expert_swiglu, x, gate_up[e], down[e])
            d_x, d_gate_up, d_down = vjp(d)
            return (grads[0].at[e].add(d_gate_up.astype(jnp.float32)),
                    grads[1].at[e].add(d_down.astype(jnp.float32))), d_x

        return cond_or_select(index < used_blocks, backward, lambda grads: (grads, jnp.zeros_like(x)), grads)

    zeros = tuple(_varying_zeros(w.shape, *residuals, d_out) for w in (gate_up, down))
    (d_gate_up, d_down), d_blocks = jax.lax.scan(
        one_block, zeros, (blocks, block_expert, jnp.arange(blocks.shape[0]), d_out))
    return d_blocks, None, None, d_gate_up.astype(gate_up.dtype), d_down.astype(down.dtype)


_swiglu_per_block.defvjp(_swiglu_per_block_forward, _swiglu_per_block_backward)


def _varying_zeros(shape, *like):
    """float32 zeros of `shape` varying over every mesh axis one of `like` varies over: inside shard_map
    (the expert-parallel FFN) a scan's carry must keep its type, and its updates vary over those axes.
    Adding a zero derived from each input joins their axes, as any arithmetic on them does."""
    zeros = jnp.zeros(shape, jnp.float32)
    for x in like:
        zeros = zeros + jnp.zeros_like(x.ravel()[0], jnp.float32)
    return zeros
