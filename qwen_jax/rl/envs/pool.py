"""Many environments at once; one that raises, hangs or crashes fails only its own episode.

    with EnvPool("countdown", num_envs=1024, timeout_s=5.0, env_kwargs={"num_numbers": 4}) as pool:
        first = pool.reset(seeds)                  # list[StepResult], one per slot
        results = pool.step({0: "3*7", 5: "..."})  # dict[slot, StepResult], the listed slots only
        pool.metrics()  # {"env/failed": .., "env/timeouts": .., "perf/env_steps_per_sec": ..}

API:
    EnvPool(factory: Callable[[], Env | AsyncEnv] | str, num_envs: int, *, mode="thread",
            timeout_s=10.0, max_workers=None, env_kwargs=None, start_method="spawn",
            startup_timeout_s=120.0)
    pool.reset(seeds: Sequence[int]) -> list[StepResult]          # every slot, seeds[slot]
    pool.reset_slots(seeds: Mapping[int, int]) -> dict[int, StepResult]  # slot -> seed
    pool.step(actions: Mapping[int, Action]) -> dict[int, StepResult]    # slot -> action
    pool.running_slots() -> list[int]; pool.metrics() -> dict[str, float]; pool.close()
A string factory is a registered env name, built with env_kwargs (`make_env`); a callable is
called as factory(**env_kwargs). The pool has slots 0..num_envs-1; an episode lives in a slot from
a reset until a result with done=True, and `step` takes actions for running slots only. Envs are
made at their slot's first reset, inside the timed call, so a constructor that raises or hangs
fails that reset like any other call. One caller at a time: the pool is not thread-safe.

Modes:
- "thread": sync Envs on max_workers daemon threads (default min(num_envs, 64)). A call's clock
  starts when it runs, not while it queues. Python cannot stop a thread, so a call past timeout_s
  is abandoned: its thread is replaced and left to finish on its own, and the env is dropped.
- "async": AsyncEnvs on one asyncio loop in a background thread; max_workers, if given, caps the
  calls in flight. A call past timeout_s is cancelled. An env that blocks the loop (time.sleep,
  heavy CPU) stalls every env: such envs belong in "thread" or "process" mode.
- "process": sync Envs in max_workers worker processes (default min(num_envs, CPU count)),
  started with start_method "spawn" or "forkserver", never fork (JAX is multithreaded). A hang is
  killed with its worker, which is restarted; see processes.py. The factory must pickle by
  reference: a top-level class or function, a functools.partial of one, or a registered name.

Failures: a failed call ends its slot's episode with StepResult(observation=None, reward=0.0,
done=True, info={}, failed=reason), and the slot's env is dropped (the next reset makes a new one).
Reasons: "timeout"; "error: <ExceptionType>: <message>" (the env raised, or returned something that
breaks the Env API); "worker died" (process mode: the worker exited); "worker restarted" (process
mode: the worker holding this episode's env was killed over another slot's failure).

Metrics: env/failed and env/timeouts are cumulative counts of failed results since the pool was
made (env/failed includes the timeouts); perf/env_steps_per_sec is slot steps per second of wall
time spent in `step` since the previous `metrics()` call (0.0 if none).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import pickle
import time
from typing import Any, Callable, Mapping, Sequence

from qwen_jax.config import ConfigError
from qwen_jax.rl.envs.api import Action, Observation, env_factory
from qwen_jax.rl.envs.backends import AsyncBackend, Outcome, ThreadBackend
from qwen_jax.rl.envs.processes import ProcessBackend

MODES = ("thread", "async", "process")
START_METHODS = ("spawn", "forkserver")
DEFAULT_MAX_THREADS = 64


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One slot's result; failed is None, or why the episode was cut short (done=True then)."""

    observation: Observation | None
    reward: float
    done: bool
    info: dict[str, Any]
    failed: str | None = None


def host_share(num_envs: int, process_index: int, process_count: int) -> range:
    """The env indices host `process_index` of `process_count` runs: contiguous, disjoint, covering
    range(num_envs), sizes differing by at most one (the first num_envs % process_count get one
    more)."""
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be an int in [0, {process_count}), "
                         f"got {process_index!r}")
    if not isinstance(num_envs, int) or num_envs < 0:
        raise ValueError(f"num_envs must be an int >= 0, got {num_envs!r}")
    base, extra = divmod(num_envs, process_count)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


class EnvPool:
    """num_envs environments run concurrently, each call under a timeout (module docstring)."""

    def __init__(self, factory: Callable[[], Any] | str, num_envs: int, *, mode: str = "thread",
                 timeout_s: float = 10.0, max_workers: int | None = None,
                 env_kwargs: Mapping[str, Any] | None = None, start_method: str = "spawn",
                 startup_timeout_s: float = 120.0):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(timeout_s, numbers.Real) or not timeout_s > 0:
            raise ConfigError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ConfigError(f"max_workers must be None or an int >= 1, got {max_workers!r}")
        if start_method not in START_METHODS:
            raise ConfigError(f"start_method must be one of {START_METHODS} (never fork: JAX is "
                              f"multithreaded), got {start_method!r}")
        make_env = _env_maker(factory, env_kwargs)
        self.num_envs = num_envs
        self.mode = mode
        if mode == "thread":
            self._backend: Any = ThreadBackend(
                make_env, num_envs, timeout_s=timeout_s,
                num_threads=min(num_envs, max_workers or DEFAULT_MAX_THREADS))
        elif mode == "async":
            self._backend = AsyncBackend(make_env, num_envs, timeout_s=timeout_s,
                                         max_concurrency=max_workers)
        else:
            _check_picklable(make_env, factory)
            self._backend = ProcessBackend(
                make_env, num_workers=min(num_envs, max_workers or os.cpu_count() or 1),
                timeout_s=timeout_s, start_method=start_method, startup_timeout_s=startup_timeout_s)
        self._running = [False] * num_envs
        self._closed = False
        self._failed = 0
        self._timeouts = 0
        self._window_steps = 0
        self._window_seconds = 0.0

    def reset(self, seeds: Sequence[int]) -> list[StepResult]:
        """Start an episode in every slot, slot i with seeds[i]."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"seeds must have one seed per slot ({self.num_envs}), got {len(seeds)}")
        results = self.reset_slots(dict(enumerate(seeds)))
        return [results[slot] for slot in range(self.num_envs)]

    def reset_slots(self, seeds: Mapping[int, int]) -> dict[int, StepResult]:
        """Start an episode in each listed slot (running or not) with its seed."""
        for slot, seed in seeds.items():
            self._check_slot(slot, "seeds")
            if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
                raise ValueError(f"seeds: slot {slot}'s seed must be an int, got {seed!r}")
        outcomes = self._run("reset", {slot: int(seed) for slot, seed in seeds.items()})
        results = {}
        for slot, (value, failure) in outcomes.items():
            if failure is None:
                observation, info = value
                results[slot] = StepResult(observation, 0.0, False, info)
            else:
                results[slot] = self._failure(failure)
            self._running[slot] = failure is None
        return results

    def step(self, actions: Mapping[int, Action]) -> dict[int, StepResult]:
        """Step each listed slot with its action; every slot must be running."""
        for slot in actions:
            self._check_slot(slot, "actions")
            if not self._running[slot]:
                raise ValueError(f"actions: slot {slot} has no running episode (it is done or "
                                 "failed, or was never reset): reset it first")
        start = time.perf_counter()
        outcomes = self._run("step", dict(actions))
        self._window_seconds += time.perf_counter() - start
        self._window_steps += len(outcomes)
        results = {}
        for slot, (value, failure) in outcomes.items():
            results[slot] = StepResult(*value) if failure is None else self._failure(failure)
            self._running[slot] = not results[slot].done
        return results

    def running_slots(self) -> list[int]:
        """The slots whose episode has not ended."""
        return [slot for slot, running in enumerate(self._running) if running]

    def metrics(self) -> dict[str, float]:
        """env/failed, env/timeouts (cumulative), perf/env_steps_per_sec (since the last call)."""
        rate = self._window_steps / self._window_seconds if self._window_seconds > 0 else 0.0
        self._window_steps, self._window_seconds = 0, 0.0
        return {"env/failed": self._failed, "env/timeouts": self._timeouts,
                "perf/env_steps_per_sec": rate}

    def close(self) -> None:
        """Stop the workers; envs still in a call are abandoned (threads) or killed (processes)."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _run(self, kind: str, args: dict[int, Any]) -> dict[int, Outcome]:
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        return self._backend.run(kind, args) if args else {}

    def _check_slot(self, slot: Any, field: str) -> None:
        if not isinstance(slot, numbers.Integral) or not 0 <= slot < self.num_envs:
            raise ValueError(f"{field}: slot {slot!r} is not in [0, {self.num_envs})")

    def _failure(self, reason: str) -> StepResult:
        self._failed += 1
        self._timeouts += reason == "timeout"
        return StepResult(None, 0.0, True, {}, reason)


def _env_maker(factory: Callable[[], Any] | str, env_kwargs: Mapping[str, Any] | None
               ) -> Callable[[], Any]:
    if isinstance(factory, str):
        # Resolved here: a spawned worker would not see names registered at run time.
        factory = env_factory(factory)
    elif not callable(factory):
        raise ConfigError(f"factory must be a callable or a registered env name, got {factory!r}")
    return functools.partial(factory, **dict(env_kwargs or {}))


def _check_picklable(make_env: Callable[[], Any], factory: Any) -> None:
    try:
        pickle.dumps(make_env)
    except Exception as exc:  # noqa: BLE001 - pickling fails in many ways, all meaning the same
        raise ConfigError(
            f"factory: mode='process' sends the factory to fresh interpreters by reference, and "
            f"{factory!r} (with env_kwargs) cannot be pickled ({exc}); use a top-level class or "
            "function, a functools.partial of one, or a registered env name") from exc
