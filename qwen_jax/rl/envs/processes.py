"""How EnvPool runs env calls in "process" mode: envs live in worker processes that can be killed.

Slot s lives in worker s % num_workers, which runs its slots' calls one at a time; the parent
sends a worker its next call when the last one is answered, and the timeout counts from sending.
A call past the timeout gets its worker killed ("timeout"), and so does a worker that exits
mid-call ("worker died"); either way a fresh worker starts at once, in the background. The killed
worker's other envs are gone with it: their episodes fail with "worker restarted" at their next
step (a reset just makes a new env in the new worker).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from qwen_jax.rl.envs.backends import Outcome, call_env, error_reason


def worker_main(conn: connection.Connection, make_env: Callable[[], Any]) -> None:
    """A worker process: answer (kind, slot, arg) messages with ("ok", value) or ("error", reason)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it then closes the pool
    envs: dict[int, Any] = {}
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:  # close: skip interpreter teardown, ~1 s with JAX and Flax loaded
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        kind, slot, arg = message
        try:
            envs[slot], value = call_env(envs.get(slot), make_env, kind, arg)
            reply = ("ok", value)
        except Exception as exc:  # noqa: BLE001 - the env's failure is this call's outcome
            envs.pop(slot, None)
            reply = ("error", error_reason(exc))
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an observation that cannot be pickled
            envs.pop(slot, None)
            conn.send(("error", error_reason(exc)))


@dataclasses.dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: connection.Connection
    started_at: float
    ready: bool = False
    hosted: set[int] = dataclasses.field(default_factory=set)  # slots with an env in this worker


@dataclasses.dataclass
class _Batch:
    """One `run`: per worker, the calls not sent yet and the (slot, deadline) of the one it runs;
    per slot, the outcome."""

    kind: str
    queues: dict[int, collections.deque[tuple[int, Any]]]
    in_flight: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    outcomes: dict[int, Outcome] = dataclasses.field(default_factory=dict)


class ProcessBackend:
    """Sync envs in `num_workers` killable worker processes (module docstring)."""

    def __init__(self, make_env: Callable[[], Any], *, num_workers: int, timeout_s: float,
                 start_method: str, startup_timeout_s: float):
        self._context = multiprocessing.get_context(start_method)
        self._make_env = make_env
        self._timeout_s = timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._lost: dict[int, str] = {}  # slot -> why its episode's env is gone
        self._workers: list[_Worker] = []
        try:
            self._workers = [self._start_worker() for _ in range(num_workers)]
            self._await_first_start()
        except BaseException:
            self.close()
            raise

    def run(self, kind: str, args: dict[int, Any]) -> dict[int, Outcome]:
        batch = _Batch(kind, collections.defaultdict(collections.deque))
        for slot, arg in args.items():
            batch.queues[slot % len(self._workers)].append((slot, arg))
        for index in list(batch.queues):
            self._feed(batch, index)
        while True:
            # Busy workers: a call in flight, or calls queued while the worker starts up.
            busy = {self._workers[index].conn: index for index, pending in batch.queues.items()
                    if index in batch.in_flight or pending}
            if not busy:
                return batch.outcomes
            wake_at = min(self._deadline(batch, index) for index in busy.values())
            for conn in connection.wait(list(busy), timeout=max(wake_at - time.monotonic(), 0.0)):
                self._receive(batch, busy[conn])
            now = time.monotonic()
            for index in set(busy.values()):
                still_busy = index in batch.in_flight or batch.queues[index]
                if still_busy and self._deadline(batch, index) <= now:
                    self._expire(batch, index)

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0.0))
            _kill(worker)
        self._workers = []

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=worker_main, args=(child_conn, self._make_env),
                                        name="EnvPool-process", daemon=True)
        process.start()
        child_conn.close()  # only the child holds its end now, so the child's exit reads as EOF
        return _Worker(process, parent_conn, time.monotonic())

    def _await_first_start(self) -> None:
        """Wait for every worker's "ready"; a worker that cannot start is a setup error: raise."""
        deadline = time.monotonic() + self._startup_timeout_s
        starting = {worker.conn: worker for worker in self._workers}
        while starting:
            ready = connection.wait(list(starting), timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise RuntimeError(f"process mode: {len(starting)} worker(s) did not start within "
                                   f"startup_timeout_s={self._startup_timeout_s}")
            for conn in ready:
                worker = starting.pop(conn)
                try:
                    conn.recv()
                except (EOFError, OSError):
                    worker.process.join(5.0)
                    raise RuntimeError(
                        f"process mode: a worker exited while starting (exit code "
                        f"{worker.process.exitcode}); the factory must be importable in a fresh "
                        "interpreter (a top-level class or function, or a registered env name), "
                        "and a script that makes the pool needs `if __name__ == '__main__':`"
                    ) from None
                worker.ready = True

    def _deadline(self, batch: _Batch, index: int) -> float:
        if index in batch.in_flight:
            return batch.in_flight[index][1]
        return self._workers[index].started_at + self._startup_timeout_s

    def _feed(self, batch: _Batch, index: int) -> None:
        """Send worker `index` its next call if it is ready and idle; answer lost episodes' steps,
        which need no worker, at once."""
        while True:
            pending = self._drop_lost(batch, index)
            if not (pending and self._workers[index].ready and index not in batch.in_flight):
                return
            slot, arg = pending.popleft()
            if batch.kind == "reset":
                self._lost.pop(slot, None)
            try:
                self._workers[index].conn.send((batch.kind, slot, arg))
            except OSError:  # the worker died while idle: its envs are gone, the call goes again
                pending.appendleft((slot, arg))
                self._replace(batch, index, lost_reason="worker died")
                continue
            except Exception as exc:  # noqa: BLE001 - the arg cannot be pickled; nothing was sent
                batch.outcomes[slot] = (None, error_reason(exc))
                continue
            batch.in_flight[index] = (slot, time.monotonic() + self._timeout_s)

    def _drop_lost(self, batch: _Batch, index: int) -> collections.deque[tuple[int, Any]]:
        """Worker `index`'s queue without the steps of lost episodes, which fail here."""
        pending = batch.queues[index]
        if batch.kind == "step" and self._lost:
            kept: collections.deque[tuple[int, Any]] = collections.deque()
            for slot, arg in pending:
                if slot in self._lost:
                    batch.outcomes[slot] = (None, self._lost.pop(slot))
                else:
                    kept.append((slot, arg))
            batch.queues[index] = pending = kept
        return pending

    def _receive(self, batch: _Batch, index: int) -> None:
        worker = self._workers[index]
        try:
            status, value = worker.conn.recv()
        except (EOFError, OSError):
            if worker.ready:
                self._replace(batch, index, in_flight_reason="worker died")
            else:
                self._fail_startup(batch, index)
        else:
            if status == "ready":
                worker.ready = True
            else:
                slot, _ = batch.in_flight.pop(index)
                if status == "ok":
                    worker.hosted.add(slot)
                    batch.outcomes[slot] = (value, None)
                else:
                    worker.hosted.discard(slot)
                    batch.outcomes[slot] = (None, value)
        self._feed(batch, index)

    def _expire(self, batch: _Batch, index: int) -> None:
        if index in batch.in_flight:
            self._replace(batch, index, in_flight_reason="timeout")
            self._feed(batch, index)
        else:
            self._fail_startup(batch, index)

    def _fail_startup(self, batch: _Batch, index: int) -> None:
        """A worker that dies or stalls before "ready": fail its queued calls, start another."""
        for slot, _ in batch.queues[index]:
            batch.outcomes[slot] = (None, "worker died")
        batch.queues[index].clear()
        self._replace(batch, index)

    def _replace(self, batch: _Batch, index: int, *, in_flight_reason: str = "worker died",
                 lost_reason: str = "worker restarted") -> None:
        """Kill worker `index` and start a new one; its call in flight fails with in_flight_reason,
        and the episodes of its other envs are lost (reported at their next step)."""
        old = self._workers[index]
        _kill(old)
        if index in batch.in_flight:
            slot, _ = batch.in_flight.pop(index)
            old.hosted.discard(slot)
            batch.outcomes[slot] = (None, in_flight_reason)
        for slot in old.hosted:
            self._lost[slot] = lost_reason
        self._workers[index] = self._start_worker()


def _kill(worker: _Worker) -> None:
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(5.0)
    worker.conn.close()
