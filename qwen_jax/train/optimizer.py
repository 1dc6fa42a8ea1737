"""AdamW with warmup + cosine (or constant) schedule, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qwen_jax.config import TrainConfig

# Only matmul weights decay; norms, A_log, dt_bias (and biases, if any) do not.
DECAYED_LEAVES = ("kernel", "embedding", "conv_weight")


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


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state stored in `dtype` between steps and updated in float32."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup + decay schedule, its moments kept in cfg.opt_state_dtype
    whatever the params' dtype (optax's own default would follow the params: bf16 with bf16 params)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        with_state_dtype(adamw, jnp.dtype(cfg.opt_state_dtype)),
    )
