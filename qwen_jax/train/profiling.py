"""Trace chosen train steps with jax.profiler and say where their time went: by model part, op kind and op.

`train.profile_steps` > 0 traces that many steps from step `train.profile_start` (metrics' step numbers)
into WORKDIR/profile/ (XProf, TensorBoard and Perfetto read it) and writes summary.json and summary.md
there. The summary takes the trace's op events (the device's own where it has them: GPU kernels, TPU
ops; XLA:CPU's thunks otherwise), each op's self time (a loop's event encloses its body's ops), and joins
each op to the compiled step's source locations: the qwen_jax/model/ file that made an op (its backward and
remat recompute included) is its part, else the qwen_jax file that did (the loss, the optimizer step).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import jax

import qwen_jax

PACKAGE = Path(qwen_jax.__file__).parent
NO_SOURCE = "(no source)"
OTHER_PROGRAMS = "(other programs)"
TOP_OPS = 30
HELPERS = ("ops/", "parallel/")  # what model files call: their ops count to the caller's part
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(")


def _table(text: str, name: str) -> list[str]:
    match = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.M)
    return match.group(1).splitlines() if match else []


def _fields(line: str) -> tuple[int, dict[str, str]]:
    key, rest = line.split(" ", 1)
    return int(key), dict(re.findall(r"(\w+)=(\d+)", rest))


def _package_path(file_name: str) -> str | None:
    """A source file's path inside the qwen_jax package ('model/attention.py'), or None if it is not one."""
    root = f"{PACKAGE}/"
    if file_name.startswith(root):
        return file_name[len(root):]
    return file_name.rsplit("/qwen_jax/", 1)[1] if "/qwen_jax/" in file_name else None


def _names(text: str, table: str) -> dict[int, str]:
    return {int(key): name.strip('"') for key, name in (line.split(" ", 1) for line in _table(text, table))}


def stack_frames(text: str) -> dict[int, list[tuple[str, str, int]]]:
    """An HLO module's text -> {stack_frame_id: [(file, function, line), innermost first]} ({} without tables)."""
    files, functions = _names(text, "FileNames"), _names(text, "FunctionNames")
    locations = {}
    for line in _table(text, "FileLocations"):
        key, fields = _fields(line)
        locations[key] = (files[int(fields["file_name_id"])], functions[int(fields["function_name_id"])],
                          int(fields["line"]))
    frames = {key: (int(fields["file_location_id"]), int(fields["parent_frame_id"]))
              for key, fields in map(_fields, _table(text, "StackFrames"))}
    # XLA's text (jaxlib 0.10) gives a frame's parent as the parent's key + 1, so a root's reads as its own
    # key; a text that gives the key itself has no frame naming itself.
    offset = 1 if any(parent == key for key, (_, parent) in frames.items()) else 0
    chains = {}
    for key in frames:
        chain, frame = [], key
        while frame in frames and len(chain) < len(frames):
            location, parent = frames[frame]
            chain.append(locations[location])
            frame = parent - offset
        chains[key] = chain
    return chains


def _kind(opcode: str, line: str) -> str:
    if opcode == "fusion":
        backend = re.search(r'"fusion_config":\{"kind":"(\w+)"', line) or re.search(r"kind=(k\w+)", line)
        return f"fusion:{backend.group(1)}" if backend else "fusion"
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call:{target.group(1)}" if target else opcode
    return opcode


def _attribution(chain: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(part, source) from an op's frames, innermost first: the model/ file that called the helpers (ops/,
    parallel/) it came from, or the innermost qwen_jax file (e.g. ops/cross_entropy.py under train/step.py);
    and the innermost qwen_jax line. The frames go on into the callers of enclosing loops, hence the first
    caller past the helpers and no further."""
    ours = [(path, function, line) for file, function, line in chain
            if (path := _package_path(file)) is not None]
    if not ours:
        return "(outside qwen_jax)", "-"
    caller = next((path for path, _, _ in ours if not path.startswith(HELPERS)), "")
    path, function, line = ours[0]
    return caller if caller.startswith("model/") else path, f"{path}:{line} {function}"


def program_ops(text: str) -> dict[str, dict]:
    """A compiled module's text (`compiled.as_text()`) -> {op name: {kind, part, source}} for every instruction:
    kind the opcode (a fusion's kind, a custom call's target), source the innermost qwen_jax file:line."""
    chains = stack_frames(text)
    ops = {}
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        frame = re.search(r"stack_frame_id=(\d+)", line)
        part, source = _attribution(chains[int(frame.group(1))]) if frame and int(frame.group(1)) in chains \
            else (NO_SOURCE, "-")
        ops[name] = dict(kind=_kind(opcode, line), part=part, source=source)
    return ops


def read_trace(directory: Path) -> list[dict]:
    """The events of the newest trace jax.profiler wrote under `directory` (its *.trace.json.gz)."""
    runs = sorted((directory / "plugins" / "profile").iterdir(), key=lambda p: p.stat().st_mtime)
    files = sorted(runs[-1].glob("*.trace.json.gz")) if runs else []
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory / 'plugins' / 'profile'}")
    with gzip.open(files[0]) as stream:
        trace = json.load(stream)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def op_events(events: list[dict]) -> tuple[str, list[dict]]:
    """Which events time the ops -> (where, events): "device", the device's op events (GPU kernels, TPU ops,
    each naming its HLO op); "device kernels", a GPU's kernels that name no HLO op (replayed from XLA's
    command buffers), by kernel name; else "host", XLA:CPU's thunks (which name their op)."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X"]
    device = [e for e in complete if processes.get(e["pid"], "").startswith("/device:")]
    if named := [e for e in device if "hlo_op" in e.get("args", {})]:
        return "device", named
    if kernels := [e for e in device if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]:
        return "device kernels", kernels
    return "host", [e for e in complete if "hlo_op" in e.get("args", {})]


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, its duration less the events nested inside it on the same track), for every event (us)."""
    tracks = collections.defaultdict(list)
    for event in events:
        tracks[event["pid"], event.get("tid")].append(event)
    out = []
    for track in tracks.values():
        track.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        open_events: list[list] = []  # [event, end, self time], outermost first
        for event in track:
            duration = event.get("dur", 0)
            while open_events and open_events[-1][1] <= event["ts"]:
                out.append(tuple(open_events.pop()[::2]))
            if open_events:
                open_events[-1][2] -= duration
            open_events.append([event, event["ts"] + duration, duration])
        out.extend(tuple(entry[::2]) for entry in open_events)
    return out


def summarize(events: list[dict], steps: int, program_text: str | None = None, step_ms: list[float] = ()) -> dict:
    """Op time per step and device (ms) by part, by kind and by op, from trace events and the step's compiled
    text (its module's ops get a kind, part and source; other programs' ops are named as such)."""
    where, ops = op_events(events)
    ops_info = program_ops(program_text) if program_text else {}
    module = re.match(r"HloModule ([\w.\-]+)", program_text).group(1) if program_text else None
    # Per device: the device's own tracks are one process each; XLA:CPU's thunks name their device.
    devices = len({e["pid"] if where == "device" else e["args"].get("device_ordinal") for e in ops}) or 1
    # Should the trace name the step's module otherwise than its text does, every op is looked up in it.
    matched = module in {e["args"].get("hlo_module") for e in ops}
    per_op: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event, self_us in self_times(ops):
        key = (event["args"].get("hlo_module", ""), event["args"].get("hlo_op", event["name"]))
        per_op[key][0] += self_us
        per_op[key][1] += 1
    rows = []
    for (op_module, op), (total_us, calls) in per_op.items():
        is_step = module is not None and (op_module == module or not matched)
        info = ops_info.get(op, {}) if is_step else {}
        part = info.get("part", NO_SOURCE if is_step else OTHER_PROGRAMS)
        rows.append({"op": op, "module": op_module, "kind": info.get("kind", "-"), "part": part,
                     "source": info.get("source", "-"), "ms_per_step": total_us / 1e3 / steps / devices,
                     "calls_per_step": calls / steps / devices})
    rows.sort(key=lambda row: -row["ms_per_step"])
    total = sum(row["ms_per_step"] for row in rows)

    def grouped(field):
        sums = collections.Counter()
        for row in rows:
            sums[row[field]] += row["ms_per_step"]
        return [{field: name, "ms_per_step": ms, "share": ms / total if total else 0.0}
                for name, ms in sums.most_common()]

    return {"steps": steps, "events": where, "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "devices": devices, "module": module,
            "module_in_trace": matched, "op_ms_per_step": total,
            "wall_ms_per_step": sum(step_ms) / len(step_ms) if step_ms else None,
            "by_part": grouped("part"), "by_kind": grouped("kind"), "top_ops": rows[:TOP_OPS]}


def summary_markdown(summary: dict) -> str:
    """summary.md: the three tables of `summarize`'s result."""
    wall = summary["wall_ms_per_step"]
    lines = [f"# Where the step's time went ({summary['device_kind']}, {summary['steps']} steps)", "",
             f"Op self time from the {summary['events']} trace, per device ({summary['devices']}): "
             f"{summary['op_ms_per_step']:.2f} ms per step"
             + (f" (wall, traced: {wall:.2f} ms)" if wall else "")
             + ". Ops that run side by side (XLA:CPU's threads) can add up to more than the wall time.", ""]
    if summary["events"] == "device kernels":
        lines += ["The GPU's kernels named no HLO op (XLA's command buffers replay them), so they are listed by "
                  "kernel name, without parts; `XLA_FLAGS=--xla_gpu_enable_command_buffer=` restores the HLO ops.", ""]
    for title, field in (("By model part", "part"), ("By op kind", "kind")):
        lines += [f"## {title}", "", f"| {field} | ms per step | share |", "|---|---|---|"]
        lines += [f"| {row[field]} | {row['ms_per_step']:.3f} | {row['share']:.1%} |"
                  for row in summary[f"by_{field}"]]
        lines.append("")
    lines += [f"## Top {TOP_OPS} ops", "", "| op | kind | part | source | ms per step | calls per step |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {row['op']} | {row['kind']} | {row['part']} | {row['source']} | {row['ms_per_step']:.3f} | "
              f"{row['calls_per_step']:g} |" for row in summary["top_ops"]]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Traces the steps numbered first .. first + count - 1 (metrics' numbers, from 1) into `directory`;
    program_text() gives the traced step's compiled text (`compiled.as_text()`) for the summary's sources."""

    def __init__(self, directory: Path, first: int, count: int, program_text: Callable[[], str | None]):
        self.directory, self.first, self.count, self.program_text = Path(directory), first, count, program_text
        self.step_ms: list[float] = []
        self.tracing = False

    def missed(self, first_step: int, last_step: int) -> str | None:
        """Why a run taking steps first_step .. last_step traces nothing (resumed past the window's start,
        or ending before it), or None."""
        if self.count and not first_step <= self.first <= last_step:
            return (f"train.profile_start is {self.first}, outside the steps this run takes ({first_step}.."
                    f"{last_step}): no steps are traced")
        return None

    def before_step(self, step: int) -> None:
        if self.count and step == self.first:
            if "torch" in sys.modules:
                warnings.warn("train.profile_steps: this process has imported torch, and jax.profiler's trace then "
                              "crashes it (a segfault, seen with jaxlib 0.10.2 and torch 2.13): the steps run "
                              "untraced; profile in a process without torch")
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                jax.profiler.start_trace(str(self.directory))
            except Exception as error:  # noqa: BLE001 - e.g. a trace already running: the run goes on untraced
                warnings.warn(f"train.profile_steps: could not start the trace ({error}); the steps run untraced")
                return
            self.tracing = True

    def after_step(self, step: int, step_s: float) -> dict | None:
        """Call once the step's outputs are ready; after the last traced step -> the summary (see stop)."""
        if not self.tracing:
            return None
        self.step_ms.append(step_s * 1e3)
        return self.stop() if step == self.first + self.count - 1 else None

    def stop(self) -> dict | None:
        """End a running trace (also when the run ends inside the window) -> its summary, written beside it."""
        if not self.tracing:
            return None
        jax.profiler.stop_trace()
        self.tracing = False
        try:
            summary = summarize(read_trace(self.directory), len(self.step_ms), self.program_text(), self.step_ms)
        except Exception as error:  # noqa: BLE001 - a summary that cannot be made must not end a run
            warnings.warn(f"the trace is in {self.directory}, but summarising it failed: {error!r}")
            return None
        (self.directory / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.directory / "summary.md").write_text(summary_markdown(summary))
        return summary
