"""The environment API every RL environment speaks, and the registry that picks one by name.

    env.reset(seed) -> (observation, info)
    env.step(action) -> (observation, reward, done, info)

An observation or action is text (str) or token ids (list[int]); `reset` is deterministic per seed.
Multi-turn: `step` returns done=False with a new observation (a tool result, say) and the loop calls
`step` again until done=True. `AsyncEnv` has the same methods as coroutines (`async def`).
isinstance(env, Env) or AsyncEnv checks the method names only; inspect.iscoroutinefunction(env.step)
tells the two apart.

An environment whose actions call tools may list them in `env.tools` (function schemas); with
rl.chat_template, the chat template shows them to the model. One whose replies have a format of
their own says what a winning reply looks like in `env.demonstration(reset_info)` (the supervised
warm-up trains on it; otherwise on " " + the answer in the reset info).

A config chooses an env by name: `make_env(config.env_name, **config.env_kwargs)`. The built-in
names are registered when `qwen_jax.rl.envs` is imported; `register_env` adds more.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Protocol, Union, runtime_checkable

from qwen_jax.config import ConfigError

Observation = Union[str, list[int]]
Action = Union[str, list[int]]


@runtime_checkable
class Env(Protocol):
    """A synchronous environment: one episode at a time, `reset` then `step` until done."""

    def reset(self, seed: int) -> tuple[Observation, dict[str, Any]]: ...

    def step(self, action: Action) -> tuple[Observation, float, bool, dict[str, Any]]: ...


@runtime_checkable
class AsyncEnv(Protocol):
    """`Env` whose `reset` and `step` are coroutines, for environments that wait on I/O."""

    async def reset(self, seed: int) -> tuple[Observation, dict[str, Any]]: ...

    async def step(self, action: Action) -> tuple[Observation, float, bool, dict[str, Any]]: ...


EnvFactory = Callable[..., Any]  # builds an Env or an AsyncEnv from keyword arguments

ENVS: dict[str, EnvFactory] = {}


def register_env(name: str, factory: EnvFactory) -> EnvFactory:
    """Make `make_env(name, **kwargs)` call `factory(**kwargs)`; returns factory (usable as decorator).

    For EnvPool's process mode the factory must be importable in a fresh interpreter: a top-level
    class or function, registered when its module is imported.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"env name must be a non-empty string, got {name!r}")
    if name in ENVS and ENVS[name] is not factory:
        raise ConfigError(f"env name {name!r} is already registered to {ENVS[name]!r}")
    ENVS[name] = factory
    return factory


def make_env(name: str, **kwargs: Any) -> Any:
    """The env registered as `name`, built with `kwargs`."""
    return env_factory(name)(**kwargs)


def env_factory(name: str) -> EnvFactory:
    """The factory registered as `name`; ConfigError naming the known ones if there is none."""
    if name not in ENVS:
        raise ConfigError(f"unknown env {name!r}; known: {', '.join(sorted(ENVS)) or 'none'}")
    return ENVS[name]


def check_reset_output(value: Any) -> tuple[Observation, dict[str, Any]]:
    """`reset`'s return value, checked: TypeError saying what is wrong if it breaks the API."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(f"reset must return (observation, info), got {_describe(value)}")
    observation, info = value
    _check_observation(observation, "reset")
    if not isinstance(info, dict):
        raise TypeError(f"reset's info must be a dict, got {_describe(info)}")
    return observation, info


def check_step_output(value: Any) -> tuple[Observation, float, bool, dict[str, Any]]:
    """`step`'s return value, checked and normalised (reward float, done bool)."""
    if not isinstance(value, tuple) or len(value) != 4:
        raise TypeError(f"step must return (observation, reward, done, info), got {_describe(value)}")
    observation, reward, done, info = value
    _check_observation(observation, "step")
    if not isinstance(reward, numbers.Real):
        raise TypeError(f"step's reward must be a real number, got {_describe(reward)}")
    if not isinstance(info, dict):
        raise TypeError(f"step's info must be a dict, got {_describe(info)}")
    return observation, float(reward), bool(done), info


def _check_observation(observation: Any, method: str) -> None:
    if not isinstance(observation, (str, list)):
        raise TypeError(f"{method}'s observation must be str or list[int], "
                        f"got {_describe(observation)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"
