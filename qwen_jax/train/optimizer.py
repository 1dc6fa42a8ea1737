"""AdamW with warmup + cosine (or constant) schedule, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from qwen_jax.config import TrainConfig

# Only matmul weights (LoRA's factors too) decay; norms, A_log, dt_bias (and biases, if any) do not.
DECAYED_LEAVES = ("kernel", "embedding", "conv_weight", "lora_a", "lora_b")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine down to lr * min_lr_ratio at cfg.steps (or constant)."""
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        decay = optax.cosine_decay_schedule(
            cfg.lr, max(cfg.steps - cfg.warmup_steps, 1), alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params):
    """True for leaves that decay (matmul weights), by leaf name."""
    def decays(key_path, _):
        last = key_path[-1]
        return str(getattr(last, "key", last)) in DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decays, params)


class RoundedState(NamedTuple):
    """An optimizer's state with its floating-point leaves in bfloat16, and the key that rounds them."""

    inner: optax.OptState
    key: jax.Array  # uint32 key data, split every step


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 x -> bfloat16, rounded away from zero with the probability of the dropped fraction: unbiased."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)  # below bf16's last kept bit
    return lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32).astype(jnp.bfloat16)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state kept in `dtype` (float32 or bfloat16) between steps, updated in float32.

    bfloat16 is rounded stochastically. Rounded to nearest, Adam's second moment stalls: its step-to-step
    decay, (1 - b2) of it, is under half a bf16 ulp (2^-9 to 2^-8 of it) once b2 > 0.99, so it stops
    following the gradients (for a constant gradient it settled at 0.80 of its value at b2 = 0.99, 0.25 at
    0.999). Rounded up with the probability of the dropped fraction it is right on average.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return optax.GradientTransformation(
            lambda params: _cast(inner.init(params), jnp.float32),
            lambda updates, state, params=None: inner.update(updates, _cast(state, jnp.float32), params))

    def init(params):
        return RoundedState(_cast(inner.init(params), jnp.bfloat16), jax.random.key_data(jax.random.key(0)))

    def update(updates, state, params=None):
        updates, new = inner.update(updates, _cast(state.inner, jnp.float32), params)
        key, this_step = jax.random.split(jax.random.wrap_key_data(state.key))
        leaves, treedef = jax.tree.flatten(new)
        keys = jax.random.split(this_step, len(leaves))
        leaves = [stochastic_round_bf16(x, k) if jnp.issubdtype(x.dtype, jnp.floating) else x
                  for x, k in zip(leaves, keys)]
        return updates, RoundedState(jax.tree.unflatten(treedef, leaves), jax.random.key_data(key))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup + decay schedule, its moments kept in cfg.opt_state_dtype
    whatever the params' dtype (optax's own default would follow the params: bf16 with bf16 params)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        with_state_dtype(adamw, jnp.dtype(cfg.opt_state_dtype)),
    )
