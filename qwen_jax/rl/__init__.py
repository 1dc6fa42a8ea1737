"""RL fine-tuning of language models: the GRPO/PPO family."""
