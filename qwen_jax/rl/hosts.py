"""RL across hosts: each host runs its share of the environments, and every host sees all episodes.

The policy is one SPMD program over the whole mesh, so every host must feed it the same prompts
and read back the same samples. The environments are not: host k runs only the slots of
`host_share(num_envs, k, count)`, and `HostSharedPool` gathers their results (observations,
rewards, failures) to every host, so the rollout code above it reads like a one-host pool's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen_jax.parallel.hosts import gather_objects
from qwen_jax.rl.envs import EnvPool, StepResult, host_share


def to_host(x) -> np.ndarray:
    """A (possibly host-spanning) array's whole value as numpy, on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class HostSharedPool:
    """An EnvPool of `num_envs` global slots whose environments run on this host's share only;
    `reset` and `step` take and return all slots (same arguments on every host)."""

    def __init__(self, factory, num_envs: int, **pool_kwargs):
        self.num_envs = num_envs
        self.slots = host_share(num_envs, jax.process_index(), jax.process_count())
        self.pool = EnvPool(factory, len(self.slots), **pool_kwargs)

    def reset(self, seeds: Sequence[int]) -> list[StepResult]:
        """seeds [num_envs] -> every slot's first result."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for a pool of {self.num_envs} slots")
        return gather_objects(self.pool.reset([seeds[slot] for slot in self.slots]))

    def step(self, actions: Mapping[int, object]) -> dict[int, StepResult]:
        """{global slot: action} -> {global slot: result} for the listed slots."""
        first = self.slots.start
        local = {slot - first: action for slot, action in actions.items() if slot in self.slots}
        results = self.pool.step(local)
        return dict(gather_objects([(slot + first, result) for slot, result in results.items()]))

    def metrics(self) -> dict[str, float]:
        """The pool counters summed over hosts (steps/s too: the hosts step at once)."""
        rows = gather_objects([self.pool.metrics()])
        return {key: float(sum(row[key] for row in rows)) for key in rows[0]}

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shared_pool(factory, num_envs: int, **pool_kwargs):
    """An EnvPool on one host; a HostSharedPool (each host its share) on several."""
    if jax.process_count() == 1:
        return EnvPool(factory, num_envs, **pool_kwargs)
    return HostSharedPool(factory, num_envs, **pool_kwargs)
