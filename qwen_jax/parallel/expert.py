"""Expert parallelism: experts sharded over the `expert` mesh axis, tokens exchanged by all-to-all.

Inside `shard_map` every device holds a slice of the tokens and E / ep experts. It sends each
routed assignment to the device that owns its expert in a fixed buffer of `capacity` rows per
destination, runs its experts on what it received, and sends the outputs back. If any device has
more assignments for one destination than the buffer holds, every device (the flag is summed over
the mesh, so all agree) takes the other branch, whose buffers hold the worst case: nothing is
ever dropped, and the common case stays small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from qwen_jax.ops.grouped_matmul import cond_or_select, expert_capacity, expert_ffn

TOKEN_AXES = ("data", "fsdp", "expert", "context")  # mesh axes the flattened tokens are split over


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, gate_up: jax.Array, down: jax.Array, *,
                        mesh: Mesh, dispatch: str, capacity_factor: float) -> jax.Array:
    """x [N, H], experts int32 [N, k], gate_up [E, H, 2I], down [E, I, H] -> per-assignment [N, k, H]."""
    num_experts, ep = gate_up.shape[0], mesh.shape["expert"]
    if num_experts % ep:
        raise ValueError(f"model.num_experts ({num_experts}) must be a multiple of mesh.expert ({ep})")
    token_axes = tuple(a for a in TOKEN_AXES if mesh.shape.get(a, 1) > 1)
    shards = 1
    for axis in token_axes:
        shards *= mesh.shape[axis]
    if x.shape[0] % shards:
        raise ValueError(f"{x.shape[0]} tokens (batch x length) do not split over the mesh axes "
                         f"{token_axes} ({shards} shards); expert parallelism needs them to")

    def local(x, experts, gate_up, down):
        return _exchange_and_run(x, experts, gate_up, down, ep=ep, token_axes=token_axes,
                                 dispatch=dispatch, capacity_factor=capacity_factor)

    tokens = PartitionSpec(token_axes)
    weights = PartitionSpec("expert")
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, weights, weights),
                         out_specs=tokens)(x, experts, gate_up, down)


def _exchange_and_run(x, experts, gate_up, down, *, ep, token_axes, dispatch, capacity_factor):
    """Per device: x [n, H], experts [n, k] (global ids), local gate_up/down [E/ep, ...] -> [n, k, H]."""
    n, k = experts.shape
    local_experts = gate_up.shape[0]
    assignments = n * k
    destination = experts.reshape(-1) // local_experts
    expert_on_destination = experts.reshape(-1) % local_experts
    order = jnp.argsort(destination, stable=True)
    sorted_destination = destination[order]
    per_destination = jnp.zeros(ep, jnp.int32).at[destination].add(1)
    slot = jnp.arange(assignments) - (jnp.cumsum(per_destination) - per_destination)[sorted_destination]
    rows = x[order // k]
    capacity = expert_capacity(assignments, ep, capacity_factor)
    overflow = jax.lax.psum(jnp.any(slot >= capacity).astype(jnp.int32), token_axes) > 0

    def exchange(capacity: int) -> jax.Array:
        send_rows = jnp.zeros((ep, capacity, x.shape[1]), x.dtype)
        send_rows = send_rows.at[sorted_destination, slot].set(rows, mode="drop")
        send_experts = jnp.full((ep, capacity), local_experts, jnp.int32)
        send_experts = send_experts.at[sorted_destination, slot].set(expert_on_destination[order],
                                                                     mode="drop")
        received = jax.lax.all_to_all(send_rows, "expert", 0, 0).reshape(ep * capacity, -1)
        received_experts = jax.lax.all_to_all(send_experts, "expert", 0, 0).reshape(-1)
        out = expert_ffn(received, jnp.arange(ep * capacity), received_experts, gate_up, down,
                         dispatch=dispatch,
                         capacity=expert_capacity(assignments, local_experts, capacity_factor))
        returned = jax.lax.all_to_all(out.reshape(ep, capacity, -1), "expert", 0, 0)
        sorted_out = returned.at[sorted_destination, slot].get(mode="fill", fill_value=0)
        return sorted_out[jnp.argsort(order)].reshape(n, k, -1)

    return cond_or_select(overflow, lambda: exchange(assignments), lambda: exchange(capacity))
