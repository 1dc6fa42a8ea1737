"""A vectorised pure-JAX environment in token space (PureJaxRL style): no tokenizer, no Python loop.

A pure-JAX env is two pure functions over a state pytree:
    reset(key) -> (state, obs)
    step(state, action) -> (state, obs, reward f32 [], done bool [])
so `jax.vmap` runs thousands of episodes in one jitted call on the accelerator (`batch_reset`,
`batch_step`). `as_env` wraps one instance in the plain Env API (token-id lists) so EnvPool and
text-side code can run it too.

The compiled functions are module-level and take the env's fields as static arguments: every
instance with the same symbol_ids and length shares one compilation.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import ConfigError
from qwen_jax.rl.envs.api import register_env


class ReverseState(NamedTuple):
    """The hidden state of one episode."""

    sequence: jax.Array  # int32 [length]: the observed tokens, to be written back reversed


class ReverseTokensEnv:
    """Observe `length` random tokens from `symbol_ids`; reward = fraction of the reversal right.

    One step per episode: `step` returns done=True and reward = mean over positions of
    (action == reversed sequence), so exact multiples of 1/length.
    """

    def __init__(self, symbol_ids: tuple[int, ...], length: int):
        symbol_ids = tuple(symbol_ids)
        if not symbol_ids or not all(isinstance(i, numbers.Integral) and 0 <= i < 2**31
                                     for i in symbol_ids):
            raise ConfigError(f"symbol_ids must be a non-empty tuple of int32 token ids >= 0, "
                              f"got {symbol_ids!r}")
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be an int >= 1, got {length!r}")
        self.symbol_ids = tuple(int(i) for i in symbol_ids)  # hashable: a static jit argument
        self.length = length

    def reset(self, key: jax.Array) -> tuple[ReverseState, jax.Array]:
        """key -> (state, obs int32 [length]), jitted."""
        return _reset(key, symbol_ids=self.symbol_ids, length=self.length)

    def step(self, state: ReverseState, action: jax.Array
             ) -> tuple[ReverseState, jax.Array, jax.Array, jax.Array]:
        """(state, action int32 [length]) -> (state, obs [length], reward f32 [], done bool [])."""
        return _step(state, self._check_action(action, 1))

    def batch_reset(self, keys: jax.Array) -> tuple[ReverseState, jax.Array]:
        """keys [N] -> (states, obs int32 [N, length]), vmapped and jitted."""
        return _batch_reset(keys, symbol_ids=self.symbol_ids, length=self.length)

    def batch_step(self, states: ReverseState, actions: jax.Array
                   ) -> tuple[ReverseState, jax.Array, jax.Array, jax.Array]:
        """(states, actions [N, length]) -> (states, obs [N, length], reward f32 [N], done [N])."""
        return _batch_step(states, self._check_action(actions, 2))

    def _check_action(self, action: jax.Array, ndim: int) -> jax.Array:
        action = jnp.asarray(action)
        if action.ndim != ndim or action.shape[-1] != self.length:
            expected = "[length]" if ndim == 1 else "[N, length]"
            raise ValueError(f"action must have shape {expected} with length={self.length}, "
                             f"got {action.shape}")
        if not jnp.issubdtype(action.dtype, jnp.integer):
            raise TypeError(f"action must hold integer token ids, got dtype {action.dtype}")
        return action.astype(jnp.int32)


def _reset_one(key: jax.Array, *, symbol_ids: tuple[int, ...], length: int
               ) -> tuple[ReverseState, jax.Array]:
    positions = jax.random.randint(key, (length,), 0, len(symbol_ids))
    sequence = jnp.asarray(symbol_ids, jnp.int32)[positions]
    return ReverseState(sequence), sequence


def _step_one(state: ReverseState, action: jax.Array
              ) -> tuple[ReverseState, jax.Array, jax.Array, jax.Array]:
    reward = jnp.mean((action == state.sequence[::-1]).astype(jnp.float32))
    return state, state.sequence, reward, jnp.array(True)


_reset = jax.jit(_reset_one, static_argnames=("symbol_ids", "length"))
_step = jax.jit(_step_one)


@functools.partial(jax.jit, static_argnames=("symbol_ids", "length"))
def _batch_reset(keys: jax.Array, *, symbol_ids: tuple[int, ...], length: int
                 ) -> tuple[ReverseState, jax.Array]:
    return jax.vmap(functools.partial(_reset_one, symbol_ids=symbol_ids, length=length))(keys)


_batch_step = jax.jit(jax.vmap(_step_one))


class JaxEnvAdapter:
    """One instance of a pure-JAX env behind the plain Env API: observations and actions are
    list[int], reward a float, done a bool; reset(seed) uses jax.random.key(seed)."""

    def __init__(self, env: Any):
        self.env = env
        self._state: Any = None

    def reset(self, seed: int) -> tuple[list[int], dict[str, Any]]:
        self._state, obs = self.env.reset(jax.random.key(seed))
        return np.asarray(obs).tolist(), {}

    def step(self, action: list[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        if self._state is None:
            raise RuntimeError("step called without an episode: call reset")
        if not isinstance(action, (list, tuple)) or not all(isinstance(t, int) for t in action):
            raise TypeError(f"action must be a list of int token ids, got {type(action).__name__}")
        self._state, obs, reward, done = self.env.step(self._state, np.asarray(action, np.int32))
        if bool(done):
            self._state = None
        return np.asarray(obs).tolist(), float(reward), bool(done), {}


def as_env(env: Any) -> JaxEnvAdapter:
    """The plain-Env view of one instance of pure-JAX `env` (anything with reset(key), step)."""
    return JaxEnvAdapter(env)


def reverse_tokens_env(symbol_ids: tuple[int, ...], length: int) -> JaxEnvAdapter:
    """The registry's "reverse_tokens": ReverseTokensEnv behind the plain Env API."""
    return as_env(ReverseTokensEnv(symbol_ids, length))


register_env("reverse_tokens", reverse_tokens_env)
