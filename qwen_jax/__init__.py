"""qwen-jax: pretrain, RL-fine-tune and resume Qwen3.5-style hybrid models in JAX/Flax NNX."""

from qwen_jax.config import ConfigError, ModelConfig, preset
from qwen_jax.generate.engine import Generation, generate
from qwen_jax.interop.hf import CheckpointError, load_hf, save_hf
from qwen_jax.model.decoder import ModelOutput, Qwen35ForCausalLM

__all__ = ["CheckpointError", "ConfigError", "Generation", "ModelConfig", "ModelOutput",
           "Qwen35ForCausalLM", "generate", "load_hf", "preset", "save_hf"]
