"""The default RL run on one CPU: a tiny policy learns to add two numbers from 0 to 9 by GRPO,
after a short supervised warm-up on the task's own demonstrations (nothing can be downloaded
here). About 3 minutes on 2 cores; experiments/rl_tiny/ holds its curve."""

from pathlib import Path

import ml_collections

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_tiny.py"))
    # A small vocabulary for a small task: the tokenizer is trained on its prompts and answers.
    config.model.vocab_size = 384
    config.model.num_hidden_layers = 4
    config.rl = ml_collections.ConfigDict({
        "env": "arithmetic",
        "env_kwargs": {"max_operand": 9, "operators": "+", "num_operands": 2},
        "pool_mode": "thread",
        "env_timeout_s": 10.0,
        "steps": 100,
        "groups": 16,
        "group_size": 8,
        "max_new_tokens": 6,
        "max_turns": 1,
        "max_length": 32,
        "temperature": 1.0,
        "advantage": "grpo",
        "policy_loss": "ppo",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "kl_estimator": "k3",
        "kl_coef": 0.0,
        "entropy_coef": 0.0,
        "aggregation": "token-mean",
        "minibatches": 2,
        "routing_replay": True,
        "lr": 3e-4,
        # Long enough that sampled answers are right about 40% of the time: GRPO learns from
        # groups whose answers differ, and a near-perfect start leaves nothing to learn.
        "warmup_steps": 120,
        "warmup_batch_size": 32,
        "warmup_lr": 3e-3,
        "eval_every": 20,
        "eval_prompts": 128,
    })
    config.checkpoint.every_steps = 20
    return config
