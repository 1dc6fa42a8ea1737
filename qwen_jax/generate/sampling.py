"""Token sampling: greedy, temperature, top-k, top-p, with per-row keys; logprobs as INTERFACES.md
defines them (under softmax(logits / temperature), before any truncation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, keys: jax.Array, *, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """logits [B, V], keys [B] (typed PRNG keys) -> (tokens int32 [B], logprobs f32 [B]).

    temperature 0 is greedy (logprob under softmax(logits)); top_k 0 and top_p 1 truncate nothing.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits)
    else:
        scaled = logits / temperature
        logprobs = jax.nn.log_softmax(scaled)
        tokens = jax.vmap(jax.random.categorical)(keys, _truncate(scaled, top_k, top_p))
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def _truncate(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """-inf outside the top_k largest and outside the smallest set whose probability reaches top_p."""
    floor = jnp.full(scaled.shape[:-1] + (1,), -jnp.inf)
    if top_k > 0:
        floor = jnp.maximum(floor, jax.lax.top_k(scaled, top_k)[0][..., -1:])
    if top_p < 1.0:
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        before = jnp.cumsum(jax.nn.softmax(ordered), axis=-1) - jax.nn.softmax(ordered)
        # Keep a token while the mass of the tokens ranked above it is still below top_p.
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
        floor = jnp.maximum(floor, jnp.take_along_axis(ordered, kept - 1, axis=-1))
    return jnp.where(scaled < floor, -jnp.inf, scaled)
