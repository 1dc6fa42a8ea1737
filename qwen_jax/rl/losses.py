"""The clipped policy-gradient objective (PPO, DAPO, GSPO) with KL and entropy terms, per token, fp32.

All inputs are [B, T] over the sequence (B responses): `mask` is 1 on the response tokens trained on
and 0 on prompt, padding, environment and tool tokens. Values at masked positions never reach the
loss or its gradient, even when they are garbage (inf, NaN, stale log-probs).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from qwen_jax.config import ConfigError

# verl's bound on log(pi / pi_old): exp stays finite in fp32 for a stale or very unlikely token.
MAX_LOG_RATIO = 20.0


def token_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: pi / pi_old per token (PPO, DAPO)."""
    return jnp.exp(_log_ratio(logprobs, old_logprobs, mask))


def sequence_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: GSPO's s_i = exp(mean over response i's tokens of log pi / pi_old), per token.

    GSPO-token form: s_i,t = sg[s_i] * pi_t / sg[pi_t]. Its value is s_i on every token, and its
    gradient is s_i * grad log pi_t, so with a sequence-level advantage and "sequence-mean"
    aggregation the gradient is exactly GSPO's (the sequence objective's gradient is
    s_i * mean_t grad log pi_t). "token-mean" weights each response by its length instead.
    """
    log_ratio = _log_ratio(logprobs, old_logprobs, mask)
    tokens = jnp.sum(mask, axis=1)
    sequence_log_ratio = jnp.sum(log_ratio * mask, axis=1) / jnp.where(tokens > 0, tokens, 1.0)
    live = jnp.where(mask > 0, logprobs, 0.0)
    return jnp.exp(jax.lax.stop_gradient(sequence_log_ratio)[:, None]
                   + live - jax.lax.stop_gradient(live))


# Each policy loss is the same clipped surrogate, -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A);
# they differ in the ratio r. "dapo" is "ppo" with clip-higher (clip_high > clip_low, DAPO uses
# 0.28 over 0.2), which PolicyLossConfig enforces so the name cannot silently mean plain PPO.
# DAPO's other parts live elsewhere: token-mean aggregation here, dynamic sampling and overlong
# reward shaping in the rollout.
POLICY_LOSSES: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "ppo": token_ratio,
    "dapo": token_ratio,
    "gspo": sequence_ratio,
}

# Estimators of KL(pi || pi_ref) per token from x = log pi - log pi_ref at tokens sampled from pi
# (Schulman's k1, k2, k3). k3 = pi_ref / pi - log(pi_ref / pi) - 1 >= 0, low variance (GRPO's);
# expm1 keeps it >= 0 in fp32, where exp(-x) + x - 1 rounds below zero for small |x|.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": lambda x: x,
    "k2": lambda x: 0.5 * x**2,
    "k3": lambda x: jnp.expm1(-x) + x,
}

AGGREGATIONS = ("token-mean", "sequence-mean")

# The settings each loss is run with in its paper. GSPO's ratio is a geometric mean over the
# response, so its clip range is three orders of magnitude below PPO's, and its objective
# averages per sequence; DAPO averages over all tokens.
RECOMMENDED = {
    "ppo": {"clip_low": 0.2, "clip_high": 0.2},
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean"},
    "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "sequence-mean"},
}


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The RL objective: which policy loss, its clip range, the KL and entropy terms, the averaging."""

    policy_loss: str = "ppo"  # a POLICY_LOSSES key
    clip_low: float = 0.2  # ratio floor 1 - clip_low
    clip_high: float = 0.2  # ratio ceiling 1 + clip_high (DAPO: 0.28)
    kl_estimator: str = "k3"  # a KL_ESTIMATORS key
    kl_coef: float = 0.0  # 0 disables the KL term: the caller can skip the reference forward
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"  # token-mean | sequence-mean (each response's mean, then mean)

    def __post_init__(self):
        for field, value, known in (("policy_loss", self.policy_loss, POLICY_LOSSES),
                                    ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
                                    ("aggregation", self.aggregation, AGGREGATIONS)):
            if value not in known:
                raise ConfigError(f"{field}={value!r} is unknown; known: {', '.join(known)}")
        if not 0 < self.clip_low < 1 or self.clip_high <= 0:
            raise ConfigError(f"clip_low must be in (0, 1) and clip_high > 0, got "
                              f"clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.policy_loss == "dapo" and self.clip_high <= self.clip_low:
            raise ConfigError(f"policy_loss='dapo' is PPO with clip-higher: clip_high must exceed "
                              f"clip_low (DAPO: 0.28 over 0.2), got clip_high={self.clip_high}, "
                              f"clip_low={self.clip_low}; use 'ppo' for a symmetric clip")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ConfigError(f"kl_coef and entropy_coef must be >= 0, got kl_coef={self.kl_coef}, "
                              f"entropy_coef={self.entropy_coef}")

    @classmethod
    def recommended(cls, policy_loss: str, **overrides) -> PolicyLossConfig:
        """The config with `policy_loss`'s settings from its paper (RECOMMENDED), then overrides."""
        if policy_loss not in RECOMMENDED:
            raise ConfigError(f"policy_loss={policy_loss!r} is unknown; known: {', '.join(RECOMMENDED)}")
        return cls(**{"policy_loss": policy_loss, **RECOMMENDED[policy_loss], **overrides})


def policy_objective(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                     mask: jax.Array, cfg: PolicyLossConfig, *, ref_logprobs: jax.Array | None = None,
                     entropy: jax.Array | None = None, token_count: jax.Array | float | None = None,
                     sequence_count: jax.Array | float | None = None,
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """[B, T] inputs, advantages [B] or [B, T] -> (loss scalar, metrics of scalars).

    loss = pg_loss + kl_coef * kl - entropy_coef * entropy, each term aggregated over the masked
    tokens. Pass the whole batch's token_count (token-mean) or sequence_count (sequence-mean) when
    this is one micro-batch of several: the micro-batch losses then sum to the batch loss exactly.
    """
    mask = mask.astype(jnp.float32)
    advantages = advantages.astype(jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.where(mask > 0, advantages, 0.0)

    def aggregate(values: jax.Array) -> jax.Array:
        return aggregate_tokens(values, mask, cfg.aggregation, token_count=token_count,
                                sequence_count=sequence_count)

    ratio = POLICY_LOSSES[cfg.policy_loss](logprobs.astype(jnp.float32),
                                           old_logprobs.astype(jnp.float32), mask)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    pg_loss = aggregate(-jnp.minimum(unclipped, clipped))
    metrics = {"actor/pg_loss": pg_loss,
               "actor/clipfrac": aggregate((clipped < unclipped).astype(jnp.float32)),
               "actor/ratio_mean": aggregate(ratio)}
    loss = pg_loss

    kl = jnp.zeros((), jnp.float32)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs (the reference policy's "
                             f"log-probs); set kl_coef=0 to train without the KL term")
        log_ratio = _log_ratio(logprobs.astype(jnp.float32), ref_logprobs.astype(jnp.float32), mask)
        kl = aggregate(KL_ESTIMATORS[cfg.kl_estimator](log_ratio))
        loss = loss + cfg.kl_coef * kl
    metrics["actor/kl"] = kl

    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} needs the per-token entropy "
                         f"(token_entropy of the logits)")
    if entropy is not None:
        mean_entropy = aggregate(entropy.astype(jnp.float32))
        metrics["actor/entropy"] = mean_entropy
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * mean_entropy
    return loss, metrics


def aggregate_tokens(values: jax.Array, mask: jax.Array, aggregation: str, *,
                     token_count: jax.Array | float | None = None,
                     sequence_count: jax.Array | float | None = None) -> jax.Array:
    """values, mask [B, T] -> scalar: the masked mean by `aggregation`; 0 when nothing is masked in."""
    # where, not a product: 0 * inf is NaN, and masked positions may hold anything.
    masked = jnp.where(mask > 0, values * mask, 0.0)
    if aggregation == "token-mean":
        total = jnp.sum(masked)
        count = jnp.sum(mask) if token_count is None else jnp.asarray(token_count, jnp.float32)
    elif aggregation == "sequence-mean":
        tokens = jnp.sum(mask, axis=1)
        total = jnp.sum(jnp.sum(masked, axis=1) / jnp.where(tokens > 0, tokens, 1.0))
        count = (jnp.sum(tokens > 0) if sequence_count is None
                 else jnp.asarray(sequence_count, jnp.float32))
    else:
        raise ConfigError(f"aggregation={aggregation!r} is unknown; known: {', '.join(AGGREGATIONS)}")
    # total is 0 whenever count is, so dividing by 1 there gives 0, not NaN.
    return total / jnp.where(count > 0, count, 1.0)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """logits [B, T, V], tokens int [B, T] -> [B, T]: log softmax(logits / temperature) at tokens, fp32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def token_entropy(logits: jax.Array) -> jax.Array:
    """logits [B, T, V] -> [B, T]: entropy of softmax(logits) in nats, fp32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(log_probs)
    # A -inf logit (a banned token) has p = 0 and log p = -inf: its term is 0, not 0 * -inf = NaN.
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def _log_ratio(logprobs: jax.Array, other_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: logprobs - other_logprobs on masked-in tokens, 0 elsewhere, in +-MAX_LOG_RATIO."""
    difference = jnp.where(mask > 0, logprobs - other_logprobs, 0.0)
    return jnp.clip(difference, -MAX_LOG_RATIO, MAX_LOG_RATIO)
