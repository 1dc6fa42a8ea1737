"""Sequence-level advantages from group rewards, chosen by name (verl's `adv_estimator`).

Every estimator maps rewards [G, K] (G prompts x K samples each) to advantages [G, K]; the policy
loss broadcasts a response's advantage over its tokens. `valid` [G, K] marks the samples whose
episode finished (env errors and time-outs are False): those get advantage 0 and are left out of
every statistic. A group whose valid rewards are all equal carries no signal and gets exactly 0.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from qwen_jax.config import ConfigError


def grpo_advantages(rewards: jax.Array, valid: jax.Array, *, eps: float,
                    normalize_std: bool = True) -> jax.Array:
    """[G, K] -> [G, K]: (r - group mean) / (group std + eps); normalize_std=False is Dr. GRPO.

    The std is the population std (divisor K). DeepSeekMath writes std() without saying which;
    verl and TRL call torch.std, the sample std (divisor K - 1), so their advantages are these
    times sqrt((K - 1) / K): a constant rescaling, e.g. 0.87 for K = 4.
    """
    centered = _centered(rewards, valid)
    if not normalize_std:
        return centered
    count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / count)
    return centered / (std + eps)


def rloo_advantages(rewards: jax.Array, valid: jax.Array, *, eps: float) -> jax.Array:
    """[G, K] -> [G, K]: r_i minus the mean of the other valid samples of its group (K >= 2).

    That is K'/(K'-1) * (r_i - group mean) with K' valid samples; a group with a single valid
    sample has no baseline and gets 0.
    """
    del eps  # nothing is divided by a statistic that can vanish
    if rewards.shape[1] < 2:
        raise ValueError(f"rloo needs K >= 2 samples per prompt (the baseline is the other "
                         f"samples' mean), got rewards of shape {rewards.shape}")
    count = jnp.sum(valid, axis=1, keepdims=True)
    # _centered is r - mean, and r - mean(others) = (r - mean) * K' / (K' - 1).
    return _centered(rewards, valid) * count / jnp.maximum(count - 1, 1)


def reinforce_pp_advantages(rewards: jax.Array, valid: jax.Array, *, eps: float) -> jax.Array:
    """[G, K] -> [G, K]: REINFORCE++ with baseline: r - group mean, over the whole batch's std.

    As OpenRLHF's reinforce_baseline, with one difference: OpenRLHF whitens over tokens (mean and
    std), so a long response weighs more; here each valid sample counts once.
    """
    centered = _centered(rewards, valid)
    # Each group's centred values sum to 0, so the batch mean is 0 and the std is the RMS.
    std = jnp.sqrt(jnp.sum(centered**2) / jnp.maximum(jnp.sum(valid), 1))
    return centered / (std + eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {
    "grpo": grpo_advantages,
    "dr_grpo": functools.partial(grpo_advantages, normalize_std=False),
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def compute_advantages(name: str, rewards: jax.Array, *, valid: jax.Array | None = None,
                       eps: float = 1e-6, **options) -> jax.Array:
    """rewards [G, K], valid bool [G, K] or None (all valid) -> advantages [G, K] float32.

    `options` go to the estimator (grpo's normalize_std).
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; known: "
                          f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, samples per group], got shape {rewards.shape}")
    valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid has shape {valid.shape}, rewards {rewards.shape}")
    return ADVANTAGE_ESTIMATORS[name](rewards, valid, eps=eps, **options)


def _centered(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """[G, K] -> [G, K]: r - mean of the group's valid rewards; 0 for invalid samples and flat groups.

    Flat groups are found by comparing min and max, not by the size of r - mean: a mean of equal
    fp32 values can miss them by an ulp, and dividing that by a zero std would make it large.
    """
    count = jnp.sum(valid, axis=1, keepdims=True)
    mean = jnp.sum(jnp.where(valid, rewards, 0.0), axis=1, keepdims=True) / jnp.maximum(count, 1)
    highest = jnp.max(jnp.where(valid, rewards, -jnp.inf), axis=1, keepdims=True)
    lowest = jnp.min(jnp.where(valid, rewards, jnp.inf), axis=1, keepdims=True)
    varies = highest > lowest  # False for a group with no valid sample too (-inf > inf)
    return jnp.where(valid & varies, rewards - mean, 0.0)
