"""How EnvPool runs env calls in its "thread" and "async" modes (see pool.py for the contract).

A backend's `run(kind, args)` calls `reset(arg)` (kind "reset") or `step(arg)` (kind "step") on the
env of every slot in `args` at once and returns an Outcome per slot: (checked return value, None)
or (None, failure reason). A failed slot's env is dropped, and the next reset makes a new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import queue
import threading
import time
from typing import Any, Callable

from qwen_jax.rl.envs.api import check_reset_output, check_step_output

Outcome = tuple[Any, str | None]
_MAX_REASON_CHARS = 500


def call_env(env: Any, make_env: Callable[[], Any], kind: str, arg: Any) -> tuple[Any, Any]:
    """One checked call, making the env first if the slot has none: (env, return value)."""
    if kind == "reset":
        env = make_env() if env is None else env
        return env, check_reset_output(env.reset(arg))
    return env, check_step_output(env.step(arg))


def error_reason(exc: BaseException) -> str:
    """"error: <ExceptionType>: <message>", the message cut to a loggable length."""
    return f"error: {type(exc).__name__}: {exc}"[:_MAX_REASON_CHARS]


class _Call:
    """One submitted function; `started_at` is set by the thread that runs it."""

    __slots__ = ("fn", "future", "started_at", "thread")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.started_at: float | None = None
        self.thread: threading.Thread | None = None


class _DaemonThreads:
    """A fixed number of working daemon threads; one stuck in a call can be retired and replaced.

    Not concurrent.futures.ThreadPoolExecutor: its threads are joined at interpreter exit, so one
    hung env would keep the program from ever exiting, and a stuck thread is lost capacity.
    """

    def __init__(self, size: int):
        self._tasks: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._retired: set[threading.Thread] = set()
        self._threads = {self._start_thread() for _ in range(size)}

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        self._tasks.put(call)
        return call

    def retire(self, call: _Call) -> None:
        """Give up on the thread running `call` (it exits when the call returns, if ever)."""
        if call.thread in self._threads:  # else it was retired already, over an earlier call
            self._threads.remove(call.thread)
            self._retired.add(call.thread)
            self._threads.add(self._start_thread())

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._work, name="EnvPool-worker", daemon=True)
        thread.start()
        return thread

    def _work(self) -> None:
        me = threading.current_thread()
        while me not in self._retired:
            call = self._tasks.get()
            if call is None:
                return
            call.thread = me
            call.started_at = time.monotonic()
            try:
                call.future.set_result(call.fn())
            except BaseException as exc:  # noqa: BLE001 - whatever the env raised is its outcome
                call.future.set_exception(exc)
        self._retired.discard(me)


class ThreadBackend:
    """Sync envs on `num_threads` daemon threads; a call running past timeout_s is abandoned."""

    def __init__(self, make_env: Callable[[], Any], num_envs: int, *, timeout_s: float,
                 num_threads: int):
        self._make_env = make_env
        self._timeout_s = timeout_s
        self._envs: list[Any] = [None] * num_envs
        self._threads = _DaemonThreads(num_threads)

    def run(self, kind: str, args: dict[int, Any]) -> dict[int, Outcome]:
        calls = {slot: self._threads.submit(functools.partial(
            call_env, self._envs[slot], self._make_env, kind, arg)) for slot, arg in args.items()}
        outcomes: dict[int, Outcome] = {}
        while calls:
            now = time.monotonic()
            for slot, call in list(calls.items()):
                if call.future.done():
                    outcomes[slot] = self._settle(slot, call.future)
                elif call.started_at is not None and now - call.started_at >= self._timeout_s:
                    self._threads.retire(call)
                    self._envs[slot] = None
                    outcomes[slot] = (None, "timeout")
                else:
                    continue
                del calls[slot]
            if calls:
                # Sleep until all finish or the earliest running call's deadline; a queued call's
                # clock starts when it runs, so its deadline is at least a full timeout away.
                started = [call.started_at for call in calls.values() if call.started_at is not None]
                wake_at = min(started) + self._timeout_s if started else now + self._timeout_s
                concurrent.futures.wait([call.future for call in calls.values()],
                                        timeout=max(wake_at - time.monotonic(), 0.0))
        return outcomes

    def close(self) -> None:
        self._threads.close()

    def _settle(self, slot: int, future: concurrent.futures.Future) -> Outcome:
        exc = future.exception()
        if exc is not None:
            self._envs[slot] = None
            return None, error_reason(exc)
        self._envs[slot], value = future.result()
        return value, None


class AsyncBackend:
    """AsyncEnvs on one asyncio loop in a daemon thread; max_concurrency caps calls in flight."""

    def __init__(self, make_env: Callable[[], Any], num_envs: int, *, timeout_s: float,
                 max_concurrency: int | None):
        self._make_env = make_env
        self._timeout_s = timeout_s
        self._envs: list[Any] = [None] * num_envs
        self._limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="EnvPool-asyncio",
                                        daemon=True)
        self._thread.start()

    def run(self, kind: str, args: dict[int, Any]) -> dict[int, Outcome]:
        return asyncio.run_coroutine_threadsafe(self._run_all(kind, args), self._loop).result()

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all_tasks(), self._loop).result(timeout=5)
        except concurrent.futures.TimeoutError:  # an env blocks the loop; the thread is a daemon
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _run_all(self, kind: str, args: dict[int, Any]) -> dict[int, Outcome]:
        slots = list(args)
        outcomes = await asyncio.gather(*(self._run_one(slot, kind, args[slot]) for slot in slots))
        return dict(zip(slots, outcomes))

    async def _run_one(self, slot: int, kind: str, arg: Any) -> Outcome:
        if self._limit is None:
            return await self._run_timed(slot, kind, arg)
        async with self._limit:
            return await self._run_timed(slot, kind, arg)

    async def _run_timed(self, slot: int, kind: str, arg: Any) -> Outcome:
        task = asyncio.ensure_future(self._call(self._envs[slot], kind, arg))
        # asyncio.wait, not wait_for: wait_for waits for the cancelled call to finish, and an env
        # that swallows CancelledError would then hang the whole batch.
        done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        if not done:
            task.cancel()
            self._envs[slot] = None
            return None, "timeout"
        try:
            self._envs[slot], value = task.result()
        except (Exception, asyncio.CancelledError) as exc:  # the env's own failure
            self._envs[slot] = None
            return None, error_reason(exc)
        return value, None

    async def _call(self, env: Any, kind: str, arg: Any) -> tuple[Any, Any]:
        if kind == "reset":
            env = self._make_env() if env is None else env
            return env, check_reset_output(await _awaited(env.reset(arg), env, "reset"))
        return env, check_step_output(await _awaited(env.step(arg), env, "step"))


async def _awaited(value: Any, env: Any, method: str) -> Any:
    if not inspect.isawaitable(value):
        raise TypeError(f"mode='async' needs an AsyncEnv: {type(env).__name__}.{method} "
                        "returned without being a coroutine")
    return await value


async def _cancel_all_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)
