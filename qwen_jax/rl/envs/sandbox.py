"""Run untrusted Python in a throw-away subprocess with limits: the Python tool of tool-use envs.

`run_python(code)` starts `sys.executable -I -S -` (isolated mode, no site-packages: the standard
library only) with the code on stdin, and:
- an empty environment: no variable of the caller's is inherited (Python sets LC_CTYPE itself);
- a fresh empty temporary working directory, deleted afterwards;
- resource limits set in the child before exec: CPU seconds, address space (memory_mb), size of
  any file written, open files, and processes (RLIMIT_NPROC, which Linux does not enforce for
  root, so a sandbox run by root can still fork);
- stdout and stderr each kept up to max_output_bytes (the rest is read and dropped);
- the whole process group killed at the wall-clock timeout;
- no network where the OS allows it: under `unshare --net --user --map-root-user` (a new, empty
  network namespace) if that works on this machine (probed once); else without, and the result
  says network_isolated=False.
This is a guard against accidents and runaway code, not a hardened jail against a determined
attacker (same user, same filesystem view outside the working directory).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_MAX_FILE_BYTES = 16 << 20  # files the code writes in its working directory
_MAX_OPEN_FILES = 64
_MAX_PROCESSES = 16


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a sandboxed run printed and how it ended.

    exit_code is the process's exit status, or -N when signal N killed it (-9 after a timeout).
    truncated: stdout or stderr was longer than max_output_bytes and was cut there.
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool
    network_isolated: bool


def run_python(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256,
               max_output_bytes: int = 4096) -> ToolResult:
    """Run `code` in the sandbox described in the module docstring."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < 32:
        raise ValueError(f"memory_mb must be an int >= 32 (the interpreter needs ~20 MB), "
                         f"got {memory_mb!r}")
    if not isinstance(max_output_bytes, int) or max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be an int >= 0, got {max_output_bytes!r}")
    prefix = network_isolation_prefix()
    workdir = tempfile.mkdtemp(prefix="qwen_jax_sandbox_")
    try:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-I", "-S", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env={}, start_new_session=True,  # its own process group, killed as one
            preexec_fn=functools.partial(_set_limits, timeout_s, memory_mb))
        try:
            stdout, stderr, truncated, timed_out = _communicate(
                process, code.encode(), time.monotonic() + timeout_s, max_output_bytes)
        finally:
            _kill_group(process)
            process.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ToolResult(stdout.decode(errors="replace"), stderr.decode(errors="replace"),
                      process.returncode, timed_out, truncated, bool(prefix))


@functools.cache
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that puts a child in an empty network namespace, or () if none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--net", "--user", "--map-root-user")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], env={},
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _set_limits(timeout_s: float, memory_mb: int) -> None:
    """In the child between fork and exec: cap what the code can use (hard = soft: no raising).

    Python warns that preexec_fn can deadlock when the parent has threads (EnvPool's thread mode):
    a lock another thread held at fork stays held. This touches no lock: setrlimit and a loop.
    """
    cpu_seconds = math.ceil(timeout_s) + 1  # a backstop: the wall-clock kill normally comes first
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, _MAX_FILE_BYTES),
                         (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES),
                         (resource.RLIMIT_NPROC, _MAX_PROCESSES),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def _communicate(process: subprocess.Popen, stdin: bytes, deadline: float,
                 max_bytes: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, read both pipes to EOF, await exit: (stdout, stderr, truncated, timed out).

    The child is left unreaped (a zombie at worst), so its pid, which is also its process group's
    id, cannot be reused before the caller kills the group.
    """
    kept = {process.stdout: bytearray(), process.stderr: bytearray()}
    truncated = False
    pending = memoryview(stdin)
    os.set_blocking(process.stdin.fileno(), False)  # a full pipe must not block past the deadline
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        selector.register(process.stdin, selectors.EVENT_WRITE)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(kept[process.stdout]), bytes(kept[process.stderr]), truncated, True
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the child exited without reading all its code
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                room = max(max_bytes - len(buffer), 0)
                truncated |= len(chunk) > room
                buffer += chunk[:room]
    exited = _await_exit(process, deadline)
    return bytes(kept[process.stdout]), bytes(kept[process.stderr]), truncated, not exited


def _await_exit(process: subprocess.Popen, deadline: float) -> bool:
    """Whether the child exits before the deadline; polls without reaping it (WNOWAIT)."""
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass
