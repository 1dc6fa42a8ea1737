"""What every benchmark here shares: the PyTorch peer on a GPU, and the commit a figure belongs to."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_peer(peer_dir, parts: str, *, env: dict | None = None, timeout_s: int = 1800) -> dict:
    """`peer_torch.py <parts>` in a subprocess with its fla wheels on PYTHONPATH -> {"lines": [...]} or {"error": ...}.

    The GPU machine's torch may live in another interpreter than ours: QWEN_JAX_PEER_PYTHON picks it.
    """
    env = dict(os.environ if env is None else env)
    peer_dir = Path(peer_dir)
    script, wheels = peer_dir / "peer_torch.py", sorted(glob.glob(str(peer_dir / "*.whl")))
    if not script.exists():
        return {"error": f"{script} not found"}
    python = env.get("QWEN_JAX_PEER_PYTHON", sys.executable)
    try:
        with tempfile.TemporaryDirectory() as site:
            if wheels:
                subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--target", site, *wheels], check=True)
            env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
            done = subprocess.run([python, str(script), *parts.split()], env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": repr(e)[:500]}
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = {"returncode": done.returncode, "lines": lines, "wheels": [Path(w).name for w in wheels]}
    if done.returncode:
        result["stderr_tail"] = done.stderr[-2000:]
    return result


def git_commit() -> str | None:
    """HEAD's hash (+ '-dirty' when the tree has changes), or None outside a repository with commits."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def guarded(name: str, run):
    """run() -> its result, or {"error": ...}, so that one failing case (an OOM, an unsupported peer
    path) does not end the whole run."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - recorded in the report, not hidden
        print(f"  {name}: ERROR {e!r}"[:300], flush=True)
        return {"error": repr(e)[:500]}


def write_report(out: Path, name: str, data: dict, markdown) -> str:
    """Write <out>/<name>.json (raw figures) and <name>.md (markdown(data)); -> the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    table = markdown(data)
    (out / f"{name}.md").write_text(table)
    return table
