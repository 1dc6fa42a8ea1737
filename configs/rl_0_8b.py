"""GRPO on countdown for a pretrained Qwen3.5-0.8B: give its weights with
--config.init_from=DIR (an HF directory with tokenizer.json, a `qwen-jax convert` directory or a
checkpoint step). Without init_from the policy would start from random weights.

    qwen-jax rl --config=configs/rl_0_8b.py --workdir=runs/rl_0_8b --config.init_from=/models/Qwen3.5-0.8B
"""

from pathlib import Path

import ml_collections

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("pretrain_0_8b.py"))
    config.rl = ml_collections.ConfigDict({
        "env": "countdown",
        "env_kwargs": {"num_numbers": 4, "max_number": 100, "max_target": 1000},
        "pool_mode": "thread",
        "env_timeout_s": 10.0,
        "steps": 500,
        "groups": 32,
        "group_size": 8,  # 256 episodes a step
        "max_new_tokens": 512,
        "max_turns": 1,
        "max_length": 768,  # the prompt (at most 130 bytes of task, 69 of ChatML markup) + the reply
        "temperature": 1.0,
        # The task, and each later environment reply (after the policy's <|im_end|>), as user turns of
        # the checkpoint's own chat template, rendered as transformers renders it. Thinking is off: its
        # reasoning would not fit in 512 new tokens.
        "chat_template": "init_from",
        "chat_template_kwargs": {"enable_thinking": False},
        "advantage": "grpo",
        "policy_loss": "dapo",  # clip-higher: low 0.2, high 0.28
        "clip_low": 0.2,
        "clip_high": 0.28,
        "kl_estimator": "k3",
        "kl_coef": 0.0,
        "entropy_coef": 0.0,
        "aggregation": "token-mean",
        "minibatches": 4,
        "routing_replay": True,
        "lr": 1e-6,
        "warmup_steps": 0,  # a pretrained policy: no supervised warm-up
        "warmup_batch_size": 32,
        "warmup_lr": 1e-5,
        "eval_every": 25,
        "eval_prompts": 256,
    })
    config.checkpoint.every_steps = 25
    return config
