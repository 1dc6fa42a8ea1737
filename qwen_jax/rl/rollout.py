"""Rollouts: the policy plays episodes in an EnvPool, token in, token out, over several turns.

Each turn samples a response for every running episode in one batched `generate` call that
continues the rows' decode cache, so nothing said before is recomputed; the environment's reply
(a tool result, say) is appended as the next turn's prompt, after the stop token where the reply
was cut at max_new_tokens. An episode's tokens are its prompt, then responses and replies in
order; only the sampled tokens are trained on (loss_mask 1), and they keep the sampler's logprobs
to check the trainer against. For MoE models every token also keeps the experts the sampler routed
it to (prompts and replies from their prefill, sampled tokens from their decode step), so that the
learner can replay them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from qwen_jax.generate.engine import generate
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.rl.hosts import to_host


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class Episodes:
    """N finished episodes, padded to max_length tokens."""

    tokens: np.ndarray  # int32 [N, S]: prompt, responses, replies; pad_id after
    segment_ids: np.ndarray  # int32 [N, S]: 1 on the episode's tokens, 0 on padding
    loss_mask: np.ndarray  # float32 [N, S]: 1 where the policy sampled tokens[t]
    sampler_logprobs: np.ndarray  # float32 [N, S]: the sampler's logprob of tokens[t] (0 elsewhere)
    rewards: np.ndarray  # float32 [N]: summed over the episode's turns
    failed: np.ndarray  # bool [N]: the environment failed (error, timeout, crash)
    env_seconds: float  # wall time inside the pool's reset and step calls
    routing: np.ndarray | None  # int8/int16 [N, L, S, k]: the sampler's experts (None: dense)


def _encode(tokenizer: Tokenizer, observation, form: str) -> list[int]:
    """Token ids as they are; text through `form` (e.g. a chat model's markup around it), then encoded."""
    if isinstance(observation, list):
        return list(observation)
    return tokenizer.encode(form.format(observation=observation)).ids


def visible_reply(text: str, opened: bool) -> str:
    """A thinking model's reply as its environment sees it: what follows the reasoning (the last
    </think>). A think block that never closes (`opened`: the prompt began it) leaves nothing."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].lstrip("\n")
    return "" if opened or THINK_OPEN in text else text


def play_episodes(model, tokenizer: Tokenizer, pool, seeds: Sequence[int], *,
                  max_new_tokens: int, max_turns: int, max_length: int, temperature: float,
                  sample_seed: int, stop_ids: Sequence[int], pad_id: int,
                  formats: tuple[str, str] = ("{observation}", "{observation}"), hide_thinking: bool = False,
                  mesh=None, rules=DEFAULT_RULES) -> Episodes:
    """One episode per slot of `pool` (an EnvPool or HostSharedPool; slot i resets with
    seeds[i]); returns them as token arrays. Text observations go through `formats` (the first
    one's, then the replies'; "{observation}" is the text). With hide_thinking the environment
    sees each reply without its reasoning (`visible_reply`); the episode keeps every token. With a
    `mesh`, the sampler's rows and cache are sharded over it as in `generate`."""
    count = len(seeds)
    env_seconds = 0.0
    started = time.perf_counter()
    resets = pool.reset(list(seeds))
    env_seconds += time.perf_counter() - started
    # Per episode: token ids, whether each was sampled, its sampler logprob (and MoE experts).
    ids = [[] for _ in range(count)]
    sampled = [[] for _ in range(count)]
    logprobs = [[] for _ in range(count)]
    cfg = model.config
    routing = None if not cfg.is_moe else np.zeros(
        (count, cfg.num_hidden_layers, max_length, cfg.num_experts_per_tok),
        expert_id_dtype(cfg.num_experts))
    rewards = np.zeros(count, np.float32)
    failed = np.array([result.failed is not None for result in resets])
    running = ~failed
    prompt_format, reply_format = formats
    prompts = [_encode(tokenizer, r.observation, prompt_format) if r.failed is None else [pad_id]
               for r in resets]
    cache = None
    for turn in range(max_turns):
        used = 0 if cache is None else int(cache.index)  # cache columns, padding included
        # Checked before the prompts join the episodes: a reply with no room is left out, so an
        # episode never outgrows max_length.
        if used + max(map(len, prompts)) + max_new_tokens > max_length:
            break  # no room for another turn: the running episodes end here, truncated
        starts = [len(row_ids) for row_ids in ids]
        for row in np.flatnonzero(running):
            ids[row] += prompts[row]
            sampled[row] += [0] * len(prompts[row])
            logprobs[row] += [0.0] * len(prompts[row])
        out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       seeds=[(sample_seed * 7919 + turn * count + row) % 2**32
                              for row in range(count)],
                       stop_ids=stop_ids, pad_id=pad_id, cache=cache, donate_cache=True,
                       max_length=max_length, mesh=mesh, rules=rules)
        if routing is not None:
            _keep_routing(routing, out, used, starts, np.flatnonzero(running))
        cache = out.cache
        tokens, lengths, new_logprobs = map(to_host, (out.tokens, out.lengths, out.logprobs))
        # Did this turn's prompt open a think block (a template with thinking on may)?
        opened = formats[turn > 0].rstrip().endswith(THINK_OPEN)
        actions, cut = {}, set()
        for row in np.flatnonzero(running):
            new = tokens[row, :lengths[row]].tolist()
            ids[row] += new
            sampled[row] += [1] * len(new)
            logprobs[row] += new_logprobs[row, :lengths[row]].tolist()
            stopped = bool(new) and new[-1] in stop_ids
            if not stopped:
                cut.add(int(row))
            answer = tokenizer.decode(new[:-1] if stopped else new)
            actions[int(row)] = visible_reply(answer, opened) if hide_thinking else answer
        started = time.perf_counter()
        results = pool.step(actions)
        env_seconds += time.perf_counter() - started
        prompts = [[pad_id]] * count
        for row, result in results.items():
            rewards[row] += result.reward
            failed[row] |= result.failed is not None
            if result.done:
                running[row] = False
            else:
                # A reply cut at max_new_tokens is closed as a finished one is (the reply format
                # follows the stop token), by a token the policy did not sample.
                closing = [stop_ids[0]] if row in cut else []
                prompts[row] = closing + _encode(tokenizer, result.observation, reply_format) or [pad_id]
        if not running.any():
            break
    return _pad(ids, sampled, logprobs, routing, rewards, failed, max_length, pad_id, env_seconds)


def expert_id_dtype(num_experts: int) -> np.dtype:
    """The smallest integer type for expert ids: the routing of every token of every layer is kept
    on the host (in int32, 1.3 GB a step for a 35B-A3B policy's 128 episodes of 8K tokens)."""
    return np.dtype(np.int8 if num_experts <= 128 else np.int16)  # ids 0..E-1


def _keep_routing(routing: np.ndarray, out, column: int, starts, rows) -> None:
    """Copy into routing [N, L, S, k], from episode position starts[row] on, the experts of each
    row's real tokens (its prompt, then its sampled tokens) that the generate call `out` wrote from
    cache column `column` on."""
    end = int(out.cache.index)
    # Sliced on the device: only this call's columns come to the host.
    valid = to_host(out.cache.valid[:, column:end])  # skips the padding between rows' tokens
    experts = to_host(out.routing[:, :, column:end])
    for row in rows:
        kept = experts[:, row, valid[row]]
        routing[row, :, starts[row]:starts[row] + kept.shape[1]] = kept


def _pad(ids, sampled, logprobs, routing, rewards, failed, max_length, pad_id,
         env_seconds) -> Episodes:
    """Lists of per-episode tokens -> fixed [N, max_length] arrays (one compiled learner step)."""
    count = len(ids)
    tokens = np.full((count, max_length), pad_id, np.int32)
    segments = np.zeros((count, max_length), np.int32)
    mask = np.zeros((count, max_length), np.float32)
    sampler = np.zeros((count, max_length), np.float32)
    for row in range(count):
        n = len(ids[row])
        tokens[row, :n], segments[row, :n] = ids[row], 1
        mask[row, :n], sampler[row, :n] = sampled[row], logprobs[row]
    return Episodes(tokens, segments, mask, sampler, rewards, failed, env_seconds, routing)
