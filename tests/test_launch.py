"""The pod launchers in launch/.

`--dry-run` must print exactly the commands a real run executes, so each launcher is run
twice: with --dry-run, and for real against stand-ins for gcloud, xpk, sbatch, srun and
qwen-jax that only record their arguments. Neither needs the real tools installed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SBATCH_SCRIPT = LAUNCH / "gpu_slurm.sbatch"

CONFIG = "configs/pretrain_0_8b.py"
SHARED_WORKDIR = "/gcs/bucket/runs/0_8b"  # a bucket mounted on every host
TRAIN = f"qwen-jax train --config={CONFIG} --workdir={SHARED_WORKDIR}"

TPU_ARGS = ["--tpu=my-v5p", "--zone=us-east5-a", f"--config={CONFIG}", f"--workdir={SHARED_WORKDIR}"]
XPK_ARGS = [
    "--cluster=my-cluster", "--workload=qwen-0-8b", "--tpu-type=v5p-128",
    "--docker-image=gcr.io/my-proj/qwen-jax:latest", f"--config={CONFIG}", f"--workdir={SHARED_WORKDIR}",
]
SLURM_ARGS = ["--nodes=2", "--gpus-per-node=8", f"--config={CONFIG}", "--workdir=/shared/runs/0_8b"]
LOCAL_CONFIG = "configs/pretrain_tiny.py"

# A value that needs quoting at both levels of the gcloud/xpk command lines.
NASTY = """--config.run.name=it's a "test" $HOME"""

# Stand-in for every external command: appends {"argv": [...], "env": {...}, "pid": ...}
# to $STUB_CALLS. As qwen-jax it also prints its QWEN_JAX_* environment (to its log), and
# the process whose id is $STUB_FAIL_ID exits 3 while the others sleep $STUB_SLEEP s.
STUB = f"""#!{sys.executable}
import json, os, sys, time
env = {{k: v for k, v in os.environ.items() if k.startswith(("QWEN_JAX_", "SRUN_"))}}
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:], "env": env,
                        "pid": os.getpid()}}) + "\\n")
print(json.dumps(env))
if env.get("QWEN_JAX_PROCESS_ID") is not None and env["QWEN_JAX_PROCESS_ID"] == os.environ.get("STUB_FAIL_ID"):
    sys.exit(3)
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
"""


@pytest.fixture
def stubs(tmp_path):
    """Environment whose PATH leads gcloud, xpk, sbatch, srun and qwen-jax to the stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "xpk", "sbatch", "srun", "qwen-jax"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_JAX_", "SLURM_", "STUB_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["STUB_CALLS"] = str(tmp_path / "calls.jsonl")
    return env


def calls(env) -> list[dict]:
    path = Path(env["STUB_CALLS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(script, *args, env, timeout=20):
    path = SBATCH_SCRIPT if script.endswith(".sbatch") else LAUNCH / script
    return subprocess.run([str(path), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def dry_run(script, *args, env) -> list[str]:
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert calls(env) == [], "--dry-run ran something"
    return result.stdout.splitlines()


# --- tpu_pod.sh -------------------------------------------------------------------------

def test_tpu_pod_dry_run(stubs):
    lines = dry_run("tpu_pod.sh", *TPU_ARGS, "--project=my-proj", "--config.train.steps=100",
                    "--", "--config.optimizer.lr=3e-4", env=stubs)
    assert lines == [
        "gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a --project=my-proj --worker=all"
        """ --command='cd ~/qwen-jax && export PATH="$HOME/.local/bin:$PATH" && pip install -e . "jax[tpu]\""""
        f" && {TRAIN} --config.train.steps=100 --config.optimizer.lr=3e-4'"
    ]


def test_tpu_pod_setup_and_repo_dir(stubs):
    (line,) = dry_run("tpu_pod.sh", *TPU_ARGS, "--no-setup", "--repo-dir=/opt/qwen jax", env=stubs)
    remote = shlex.split(line)[-1].removeprefix("--command=")
    assert remote == f"""cd '/opt/qwen jax' && export PATH="$HOME/.local/bin:$PATH" && {TRAIN}"""
    (line,) = dry_run("tpu_pod.sh", *TPU_ARGS, "--setup=bash tools/setup.sh && pip install -e .", env=stubs)
    assert "&& bash tools/setup.sh && pip install -e . && qwen-jax train " in line
    assert "--project" not in line  # left to gcloud's configured project


def test_tpu_pod_copy(stubs):
    mkdir, scp, ssh = dry_run("tpu_pod.sh", *TPU_ARGS, "--copy", env=stubs)
    flags = ["--zone=us-east5-a", "--worker=all"]
    assert mkdir == "gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a --worker=all --command='mkdir -p ~/qwen-jax'"
    words = shlex.split(scp)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert words[-3:] == ["my-v5p:qwen-jax", *flags]  # scp paths are relative to the remote home
    sources = {Path(w).relative_to(REPO).as_posix() for w in words[6:-3]}
    assert {"pyproject.toml", "README.md", "qwen_jax", "configs", "launch"} <= sources
    assert not {".git", ".venv", "qwen_jax.egg-info"} & sources
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a --worker=all --command='cd ~/qwen-jax && ")
    assert ssh.endswith(f" && {TRAIN}'")


def test_tpu_pod_quoting_round_trips(stubs):
    (line,) = dry_run("tpu_pod.sh", *TPU_ARGS, "--", NASTY, "--config.b=", env=stubs)
    remote = shlex.split(line)[-1].removeprefix("--command=")
    assert shlex.split(remote)[-2:] == [NASTY, "--config.b="]


# --- tpu_xpk.sh -------------------------------------------------------------------------

def test_tpu_xpk_dry_run(stubs):
    lines = dry_run("tpu_xpk.sh", *XPK_ARGS, "--num-slices=4", "--zone=us-east5-a", "--project=my-proj",
                    "--xpk-arg=--max-restarts=3", "--", "--config.train.steps=100", env=stubs)
    assert lines == [
        "xpk workload create --cluster=my-cluster --workload=qwen-0-8b --tpu-type=v5p-128 --num-slices=4"
        " --docker-image=gcr.io/my-proj/qwen-jax:latest --zone=us-east5-a --project=my-proj --max-restarts=3"
        f" --command='{TRAIN} --config.train.steps=100'"
    ]


def test_tpu_xpk_defaults_and_quoting(stubs):
    (line,) = dry_run("tpu_xpk.sh", *XPK_ARGS, "--", NASTY, env=stubs)
    words = shlex.split(line)
    assert "--num-slices=1" in words
    assert not [w for w in words if w.startswith(("--zone", "--project"))]
    assert shlex.split(words[-1].removeprefix("--command=")) == [*shlex.split(TRAIN), NASTY]


# --- gpu_slurm.sh / gpu_slurm.sbatch ----------------------------------------------------

def test_gpu_slurm_dry_run(stubs):
    lines = dry_run("gpu_slurm.sh", *SLURM_ARGS, "--partition=gpu", "--time=2-00:00:00", "--account=proj",
                    "--cpus-per-task=12", "--sbatch-arg=--exclusive", "--", "--config.train.steps=100", env=stubs)
    assert lines[0] == (
        "sbatch --job-name=qwen-jax --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu"
        f" --account=proj --time=2-00:00:00 --cpus-per-task=12 --exclusive {SBATCH_SCRIPT}"
        f" --config={CONFIG} --workdir=/shared/runs/0_8b --config.train.steps=100"
    )
    # Then the submitted script, as comments so the whole output stays safe to paste.
    body = lines[1:]
    assert body and all(line.startswith("#") for line in body)
    assert [line.removeprefix("# ") for line in body[1:]] == SBATCH_SCRIPT.read_text().splitlines()


def test_gpu_slurm_sbatch_script(stubs):
    """The batch script: one task per GPU by default, and `srun qwen-jax train "$@"`."""
    directives = [line.split()[1] for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives
    env = {**stubs, "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "12"}
    result = launch("gpu_slurm.sbatch", f"--config={CONFIG}", "--workdir=/shared/r", NASTY, env=env)
    assert result.returncode == 0, result.stderr
    (call,) = calls(env)
    assert call["argv"] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "qwen-jax", "train",
                            f"--config={CONFIG}", "--workdir=/shared/r", NASTY]
    assert call["env"]["SRUN_CPUS_PER_TASK"] == "12"
    assert launch("gpu_slurm.sbatch", env=stubs).returncode != 0  # no train arguments


# --- dry run == real run ----------------------------------------------------------------

@pytest.mark.parametrize("script,args", [
    ("tpu_pod.sh", [*TPU_ARGS, "--project=p", "--copy", "--", NASTY]),
    ("tpu_pod.sh", [*TPU_ARGS, "--no-setup", "--repo-dir=~/my repo"]),
    ("tpu_xpk.sh", [*XPK_ARGS, "--xpk-arg=--priority=high", "--", NASTY]),
    ("gpu_slurm.sh", [*SLURM_ARGS, "--partition=gpu", "--", NASTY]),
    ("local.sh", ["--num-processes=1", f"--config={LOCAL_CONFIG}", "--workdir=/tmp/x", "--", NASTY]),
])
def test_dry_run_prints_what_a_real_run_runs(stubs, script, args):
    printed = [shlex.split(line) for line in dry_run(script, *args, env=stubs) if not line.startswith("#")]
    result = launch(script, *args, env=stubs)
    assert result.returncode == 0, result.stderr
    assert [call["argv"] for call in calls(stubs)] == printed


# --- local.sh ---------------------------------------------------------------------------

def test_local_single_process(stubs, tmp_path):
    lines = dry_run("local.sh", "--num-processes=1", f"--config={LOCAL_CONFIG}", f"--workdir={tmp_path}/w",
                    "--config.train.steps=2", env=stubs)
    assert lines == [f"qwen-jax train --config={LOCAL_CONFIG} --workdir={tmp_path}/w --config.train.steps=2"]
    assert launch("local.sh", "--num-processes=1", f"--config={LOCAL_CONFIG}", f"--workdir={tmp_path}/w",
                  env=stubs).returncode == 0
    (call,) = calls(stubs)
    assert call["env"] == {}  # a single process needs no coordinator


def test_local_multi_process_dry_run(stubs):
    lines = dry_run("local.sh", "--num-processes=3", "--port=23456", f"--config={LOCAL_CONFIG}",
                    "--workdir=runs/my run", "--", "--config.train.steps=2", env=stubs)
    train = f"qwen-jax train --config={LOCAL_CONFIG} --workdir='runs/my run' --config.train.steps=2"
    assert lines == [
        "mkdir -p 'runs/my run'",
        *[f"QWEN_JAX_COORDINATOR=localhost:23456 QWEN_JAX_NUM_PROCESSES=3 QWEN_JAX_PROCESS_ID={i} {train}"
          f" > 'runs/my run/process_{i}.log' 2>&1 &" for i in range(3)],
        "wait",
    ]


def test_local_multi_process_run(stubs, tmp_path):
    workdir = tmp_path / "w"
    result = launch("local.sh", "--num-processes=3", f"--config={LOCAL_CONFIG}", f"--workdir={workdir}",
                    "--", NASTY, env=stubs)
    assert result.returncode == 0, result.stderr
    runs = sorted(calls(stubs), key=lambda c: int(c["env"]["QWEN_JAX_PROCESS_ID"]))
    assert [c["env"] for c in runs] == [
        {"QWEN_JAX_COORDINATOR": "localhost:12355", "QWEN_JAX_NUM_PROCESSES": "3", "QWEN_JAX_PROCESS_ID": str(i)}
        for i in range(3)
    ]
    assert all(c["argv"] == ["qwen-jax", "train", f"--config={LOCAL_CONFIG}", f"--workdir={workdir}", NASTY]
               for c in runs)
    for i in range(3):  # each process's output lands in its own log
        assert json.loads((workdir / f"process_{i}.log").read_text())["QWEN_JAX_PROCESS_ID"] == str(i)


def test_local_one_failure_stops_the_rest(stubs, tmp_path):
    env = {**stubs, "STUB_FAIL_ID": "1", "STUB_SLEEP": "60"}
    start = time.monotonic()
    result = launch("local.sh", "--num-processes=3", f"--config={LOCAL_CONFIG}", f"--workdir={tmp_path}/w", env=env)
    assert result.returncode == 3
    assert time.monotonic() - start < 10
    assert "process 1 failed with status 3" in result.stderr
    for call in calls(env):  # the survivors were stopped, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(call["pid"], 0)


# --- arguments --------------------------------------------------------------------------

def without(args, prefix):
    return [a for a in args if not a.startswith(prefix)]


LOCAL_ARGS = ["--num-processes=2", f"--config={LOCAL_CONFIG}", "--workdir=/tmp/x"]
BAD_ARGS = [
    *[("tpu_pod.sh", without(TPU_ARGS, flag), flag) for flag in ("--tpu", "--zone", "--config", "--workdir")],
    ("tpu_pod.sh", [*TPU_ARGS, "--zone", "us-east5-a"], "--zone"),
    ("tpu_pod.sh", [*TPU_ARGS, "--worker=all"], "--worker=all"),
    ("tpu_pod.sh", [*TPU_ARGS, "--config.train.steps", "5"], "--config.train.steps"),
    *[("tpu_xpk.sh", without(XPK_ARGS, flag), flag)
      for flag in ("--cluster", "--workload", "--tpu-type", "--docker-image", "--config", "--workdir")],
    ("tpu_xpk.sh", [*XPK_ARGS, "--workload=Qwen_Run"], "--workload"),
    ("tpu_xpk.sh", [*XPK_ARGS, "--workload=" + "a" * 41], "--workload"),
    ("tpu_xpk.sh", [*XPK_ARGS, "--num-slices=0"], "--num-slices"),
    *[("gpu_slurm.sh", without(SLURM_ARGS, flag), flag)
      for flag in ("--nodes", "--gpus-per-node", "--config", "--workdir")],
    ("gpu_slurm.sh", [*SLURM_ARGS, "--gpus-per-node=eight"], "--gpus-per-node"),
    ("gpu_slurm.sh", [*SLURM_ARGS, "--cpus-per-task=-1"], "--cpus-per-task"),
    *[("local.sh", without(LOCAL_ARGS, flag), flag) for flag in ("--num-processes", "--config", "--workdir")],
    ("local.sh", [*LOCAL_ARGS, "--num-processes=0"], "--num-processes"),
    ("local.sh", [*LOCAL_ARGS, "--port=70000"], "--port"),
    ("local.sh", [*LOCAL_ARGS, "--config=configs/no_such_file.py"], "--config"),
    ("local.sh", [*LOCAL_ARGS, "stray"], "stray"),
]


@pytest.mark.parametrize("script,args,flag", BAD_ARGS, ids=[f"{s}:{f}" for s, _, f in BAD_ARGS])
def test_bad_arguments_name_the_flag(stubs, script, args, flag):
    for extra in (["--dry-run"], []):
        result = launch(script, *args, *extra, env=stubs)
        assert result.returncode != 0
        assert "error:" in result.stderr and flag in result.stderr, result.stderr
    assert calls(stubs) == []


@pytest.mark.parametrize("script", ["tpu_pod.sh", "tpu_xpk.sh", "gpu_slurm.sh", "local.sh"])
def test_help(stubs, script):
    result = launch(script, "--help", env=stubs)
    assert result.returncode == 0 and result.stdout.startswith("Usage: ") and "--dry-run" in result.stdout
    assert calls(stubs) == []


@pytest.mark.parametrize("script, args", [("tpu_pod.sh", TPU_ARGS), ("tpu_xpk.sh", XPK_ARGS),
                                          ("gpu_slurm.sh", SLURM_ARGS), ("local.sh", LOCAL_ARGS)])
def test_a_bucket_url_workdir_is_refused(stubs, script, args):
    """qwen-jax writes WORKDIR through the file system: gs://B/RUN would become a local gs:/B/RUN."""
    result = launch(script, *without(args, "--workdir"), "--workdir=gs://bucket/runs/0_8b", "--dry-run", env=stubs)
    assert result.returncode == 2 and "--workdir=gs://bucket/runs/0_8b is a URL" in result.stderr
    assert "e.g. --workdir=/gcs/bucket/runs/0_8b" in result.stderr and calls(stubs) == []


# --- launch/README.md ---------------------------------------------------------------------

def test_readme_examples_are_current(stubs):
    """Every `$ launch/... --dry-run` example in the README shows what that command prints."""
    readme = (LAUNCH / "README.md").read_text()
    examples = [block.split("```")[0] for block in readme.split("```console\n$ ")[1:]]
    assert len(examples) == 4
    for example in examples:
        lines = example.splitlines()
        command = []  # the command spans the lines that end in a backslash, and one more
        while lines[0].endswith("\\"):
            command.append(lines.pop(0)[:-1])
        command.append(lines.pop(0))
        words = shlex.split(" ".join(command))
        assert "--dry-run" in words[:words.index("--")] if "--" in words else "--dry-run" in words
        printed = launch(words[0].removeprefix("launch/"), *words[1:], env=stubs).stdout.splitlines()
        shown = [line.replace("/path/to/qwen-jax", str(REPO)) for line in lines if not line.startswith("# ...")]
        assert shown and all(line in printed for line in shown), (shown, printed)
    assert calls(stubs) == []
