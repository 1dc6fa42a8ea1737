"""Pallas kernels; each has a pure-JAX op in qwen_jax.ops as its oracle and its fallback."""
