"""A short supervised warm-up on the task's own demonstrations, so a policy trained from scratch (or
a pretrained one new to the task's format) starts RL with a reward it can climb from."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig, TrainConfig
from qwen_jax.data.tokenizer import pad_id, stop_ids
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.train.step import make_trainer

WARMUP_SEED_BASE = 2 * 10**9  # demonstration prompts: apart from the RL and held-out seeds
ANSWER_FIELDS = ("expected", "solution")  # where the built-in tasks keep the right answer


def demonstrations(env, seeds: Iterable[int]) -> list[tuple[str, str]]:
    """(prompt, reply) pairs from a task whose reset info holds the answer: env.demonstration(info)
    where the task writes its replies in a format of its own, else " answer"."""
    pairs = []
    for seed in seeds:
        prompt, info = env.reset(seed)
        if hasattr(env, "demonstration") and isinstance(prompt, str):
            pairs.append((prompt, env.demonstration(info)))
            continue
        field = next((name for name in ANSWER_FIELDS if name in info), None)
        if field is None or not isinstance(prompt, str):
            raise ConfigError(f"rl.warmup_steps > 0 needs a text task whose reset info holds the "
                              f"answer ({' or '.join(ANSWER_FIELDS)}); {type(env).__name__} gives "
                              f"{sorted(info)}: set rl.warmup_steps=0")
        pairs.append((prompt, f" {info[field]}"))
    return pairs


def demonstration_batch(pairs, tokenizer: Tokenizer, seq_len: int,
                        prompt_format: str = "{observation}") -> dict[str, np.ndarray]:
    """Rows prompt (through prompt_format) + answer + the first stop id (`<|im_end|>` where the tokenizer
    has one, else `<|endoftext|>`), loss only on the answer and that stop (what the policy must say)."""
    eos, pad = stop_ids(tokenizer)[0], pad_id(tokenizer)
    batch = {"input_ids": np.full((len(pairs), seq_len), pad, np.int32),
             "targets": np.full((len(pairs), seq_len), pad, np.int32),
             "segment_ids": np.zeros((len(pairs), seq_len), np.int32),
             "loss_mask": np.zeros((len(pairs), seq_len), np.float32)}
    for row, (prompt, answer) in enumerate(pairs):
        prompt_ids = tokenizer.encode(prompt_format.format(observation=prompt)).ids
        answer_ids = tokenizer.encode(answer).ids + [eos]
        ids = (prompt_ids + answer_ids)[:seq_len + 1]
        n = len(ids) - 1
        batch["input_ids"][row, :n], batch["targets"][row, :n] = ids[:-1], ids[1:]
        batch["segment_ids"][row, :n] = 1
        batch["loss_mask"][row, len(prompt_ids) - 1:n] = 1
    return batch


def supervised_warmup(model_cfg: ModelConfig, env, tokenizer: Tokenizer, rl, *, seed: int, params=None):
    """`params` (default: fresh ones from `seed`) trained rl.warmup_steps steps on demonstrations."""
    steps = max(rl.warmup_steps, 1)
    train = TrainConfig(steps=steps, batch_size=rl.warmup_batch_size, seq_len=rl.max_length,
                        lr=rl.warmup_lr, warmup_steps=min(10, steps - 1))
    # This host's first device: every host trains the same tiny policy the same way.
    trainer = make_trainer(model_cfg, train, make_mesh({"data": 1}, jax.local_devices()[:1]),
                           DEFAULT_RULES)
    state = trainer.init_state(seed, params)
    for step in range(rl.warmup_steps):
        first = WARMUP_SEED_BASE + step * rl.warmup_batch_size
        pairs = demonstrations(env, range(first, first + rl.warmup_batch_size))
        batch = demonstration_batch(pairs, tokenizer, rl.max_length, rl.prompt_format)
        state, _ = trainer.step_fn(state, trainer.global_batch(batch))
    return jax.device_get(state["params"])
