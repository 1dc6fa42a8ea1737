"""Batched generation: one jitted prefill over right-padded prompts, then a compiled decode loop
(`lax.while_loop`) that stops when every row has hit a stop token or its budget."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qwen_jax.generate.cache import Cache, cache_shardings
from qwen_jax.generate.sampling import sample
from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding, hashable_rules


@struct.dataclass
class Generation:
    """tokens int32 [B, N] (pad after a row stops; a stop token is kept), logprobs f32 [B, N]
    (0 after the stop), lengths int32 [B] (new tokens per row, stop token included), cache (holds
    prompt and new tokens, to continue the rows), routing int32 [L, B, S, k] for MoE models (the
    experts of each cache column this call wrote, 0 elsewhere; `cache.valid` marks the real
    tokens among them; None for dense)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    cache: Cache
    routing: jax.Array | None = None


def right_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, T], segment_ids [B, T]: 1 on tokens, 0 on the padding after them)."""
    width = max(len(row) for row in rows)
    if width == 0:
        raise ValueError("every prompt is empty; a prompt needs at least one token")
    ids = np.full((len(rows), width), pad_id, np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        if not len(row):
            raise ValueError(f"prompt {b} is empty; a prompt needs at least one token")
        ids[b, : len(row)], segments[b, : len(row)] = row, 1
    return ids, segments


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seeds: int | Sequence[int] = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0, cache: Cache | None = None,
             donate_cache: bool = False, max_length: int | None = None, mesh=None, rules=DEFAULT_RULES,
             pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None) -> Generation:
    """Sample up to max_new_tokens after each prompt (token lists of any lengths).

    Prompts with images hold each image's `<vision_start> <image_pad> x n <vision_end>` block, and
    pixel_values [num_patches, D] / image_grid_thw [num_images, 3] give the images in the order of
    those blocks, row after row (HF's layout); the prefill embeds them and sets 3-D positions, and
    the new tokens continue from the largest position + 1, as HF's rope deltas do. Videos the same
    way: pixel_values_videos / video_grid_thw, each temporal patch's block after its timestamp.

    With `cache` (an earlier Generation's), the prompts are appended to those rows (an environment's
    reply, say) and nothing before them is recomputed. donate_cache=True lets the returned cache take
    over that cache's buffers (no copy of it; it cannot be used afterwards). max_length (prompt + new
    tokens, default just enough) sizes a fresh cache; leave room there for later turns. With a `mesh`,
    the cache and the activations are sharded by the logical-axis `rules`, as in training (rows over
    the batch axes, heads over `tensor`); the model's params keep the placement they have.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids, segments = right_pad(prompts, pad_id)
    batch = ids.shape[0]
    # A fresh cache is created inside the compiled call, so no zeroed [B, S, ...] buffers are built
    # and then copied into the decode loop (an argument that is not donated must be copied).
    columns = cache.max_length if cache is not None else max_length or ids.shape[1] + max_new_tokens
    needed = (0 if cache is None else int(cache.index)) + ids.shape[1] + max_new_tokens
    if needed > columns:
        raise ValueError(f"the cache holds {columns} columns but this call needs {needed} "
                         "(max_length too small for prompt + max_new_tokens)")
    seeds = [seeds] * batch if isinstance(seeds, int) else list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    given = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                 pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    pixels = {name: jnp.asarray(value, jnp.int32 if "grid" in name else None)
              for name, value in given.items() if value is not None}
    graphdef, state = nnx.split(model)
    run = _generate_donating if donate_cache and cache is not None else _generate
    return run(graphdef, state, jnp.asarray(ids), jnp.asarray(segments), cache, keys,
               jnp.asarray(list(stop_ids) or [-1], jnp.int32), pixels, max_new_tokens=max_new_tokens,
               max_length=columns, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
               pad_id=pad_id, mesh=mesh, rules=hashable_rules(rules))


def _generate_call(graphdef, state, ids, segments, cache, keys, stop_ids, pixels, *, max_new_tokens,
                   max_length, temperature, top_k, top_p, pad_id, mesh, rules):
    """Prefill, then the while_loop of sample-and-feed steps; cache None: a fresh one of max_length."""
    model = nnx.merge(graphdef, state)
    if cache is None:
        cache = model.init_cache(ids.shape[0], max_length)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, rules))
    # Entered while tracing, so the sharding constraints are part of this compiled program.
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh, rules):
        return _decode(model, ids, segments, cache, keys, stop_ids, pixels,
                       max_new_tokens, temperature, top_k, top_p, pad_id)


_STATIC = ("graphdef", "max_new_tokens", "max_length", "temperature", "top_k", "top_p", "pad_id", "mesh",
           "rules")
_generate = jax.jit(_generate_call, static_argnames=_STATIC)
_generate_donating = jax.jit(_generate_call, static_argnames=_STATIC, donate_argnames="cache")


def _decode(model, ids, segments, cache, keys, stop_ids, pixels, max_new_tokens, temperature, top_k,
            top_p, pad_id):
    batch = ids.shape[0]
    moe = model.config.is_moe
    routing = None
    if moe:
        routing = jnp.zeros((model.config.num_hidden_layers, batch, cache.max_length,
                             model.config.num_experts_per_tok), jnp.int32)

    def forward(tokens, token_segments, cache, routing, pixels):
        start = cache.index
        out = model(tokens, segment_ids=token_segments, cache=cache, **pixels)
        if moe:
            routing = jax.lax.dynamic_update_slice(routing, out.routing, (0, 0, start, 0))
        return out, routing

    out, routing = forward(ids, segments, cache, routing, pixels)
    last = jnp.sum(segments, axis=1) - 1  # each row's last prompt token
    # Logits of that token only: the prefill's [B, T, V] logits are never used, so XLA drops them.
    logits = model.logits(jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0])

    def body(carry):
        step, cache, logits, tokens, logprobs, lengths, done, routing = carry
        token, logprob = sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full(batch, step)),
                                temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        # The new token joins the cache (a row that stopped earlier adds padding), so a later call
        # continues after it.
        out, routing = forward(token[:, None], (~done).astype(jnp.int32)[:, None], cache, routing, {})
        lengths = lengths + ~done
        done = done | jnp.isin(token, stop_ids)
        return step + 1, out.cache, out.logits[:, 0], tokens, logprobs, lengths, done, routing

    def more(carry):
        step, done = carry[0], carry[6]
        return (step < max_new_tokens) & ~jnp.all(done)

    init = (jnp.zeros((), jnp.int32), out.cache, logits,
            jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens)),
            jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), routing)
    _, cache, _, tokens, logprobs, lengths, _, routing = jax.lax.while_loop(more, body, init)
    return Generation(tokens=tokens, logprobs=logprobs, lengths=lengths, cache=cache, routing=routing)
