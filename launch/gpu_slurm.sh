#!/usr/bin/env bash
# Submit launch/gpu_slurm.sbatch: `qwen-jax train` on N nodes x G GPUs, one process per GPU.
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

SBATCH_SCRIPT=$REPO_ROOT/launch/gpu_slurm.sbatch

usage() {
  cat <<EOF
Usage: $PROG --nodes=N --gpus-per-node=G --config=FILE --workdir=DIR
         [--partition=P] [--account=A] [--time=T] [--job-name=NAME] [--cpus-per-task=C]
         [--sbatch-arg=ARG ...] [--dry-run] [--config.a.b=V ...] [-- EXTRA TRAIN ARGS...]

Runs:
  sbatch --job-name=NAME --nodes=N --ntasks-per-node=G --gpus-per-node=G [...] \\
      $SBATCH_SCRIPT --config=FILE --workdir=DIR [...]
and the script runs 'srun qwen-jax train ...': N*G processes; jax.distributed finds
its coordinator (the first node) and the process ids from SLURM's variables.

  --nodes=N          nodes (required)
  --gpus-per-node=G  GPUs, and so processes, per node (required)
  --config=FILE      config file (required); relative paths are from the directory you
                     submit from, which is where the job starts
  --workdir=DIR      checkpoints and logs, on storage every node shares (required)
  --partition=P, --account=A, --time=T, --cpus-per-task=C
                     the sbatch options of the same names (default: the cluster's)
  --job-name=NAME    job name (default: qwen-jax); the log is NAME-JOBID.out
  --sbatch-arg=ARG   one more sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)
  --dry-run          print the sbatch command, then the script it submits (as comments)
  --config.a.b=V     passed on to qwen-jax train, as is everything after --

Submit with qwen-jax on PATH (e.g. a virtual environment on shared storage, activated):
the job inherits your environment.

Example:
  $PROG --nodes=2 --gpus-per-node=8 --partition=gpu \\
      --config=configs/pretrain_0_8b.py --workdir=/shared/runs/0_8b
EOF
}

NODES='' GPUS='' CONFIG='' WORKDIR='' PARTITION='' ACCOUNT='' TIME='' JOB_NAME=qwen-jax CPUS='' DRY_RUN=0
SBATCH_ARGS=() EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --nodes=*) NODES=$(value_of "$1") ;;
    --gpus-per-node=*) GPUS=$(value_of "$1") ;;
    --config=*) CONFIG=$(value_of "$1") ;;
    --workdir=*) WORKDIR=$(value_of "$1") ;;
    --partition=*) PARTITION=$(value_of "$1") ;;
    --account=*) ACCOUNT=$(value_of "$1") ;;
    --time=*) TIME=$(value_of "$1") ;;
    --job-name=*) JOB_NAME=$(value_of "$1") ;;
    --cpus-per-task=*) CPUS=$(value_of "$1") ;;
    --sbatch-arg=*) SBATCH_ARGS+=("$(value_of "$1")") ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*=*) EXTRA+=("$1") ;;
    --) shift; EXTRA+=("$@"); break ;;
    --nodes | --gpus-per-node | --config | --workdir | --partition | --account | --time | \
      --job-name | --cpus-per-task | --sbatch-arg | --config.*) no_value "$1" ;;
    *) die "unknown argument '$1' (train arguments go after --)" ;;
  esac
  shift
done
require "$NODES" --nodes
require "$GPUS" --gpus-per-node
require "$CONFIG" --config
require "$WORKDIR" --workdir
require_path_workdir "$WORKDIR"
require "$JOB_NAME" --job-name
require_positive_int "$NODES" --nodes
require_positive_int "$GPUS" --gpus-per-node
if [[ -n $CPUS ]]; then require_positive_int "$CPUS" --cpus-per-task; fi

# One task per GPU: the task count per node always equals the GPU count per node.
CMD=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS")
if [[ -n $PARTITION ]]; then CMD+=(--partition="$PARTITION"); fi
if [[ -n $ACCOUNT ]]; then CMD+=(--account="$ACCOUNT"); fi
if [[ -n $TIME ]]; then CMD+=(--time="$TIME"); fi
if [[ -n $CPUS ]]; then CMD+=(--cpus-per-task="$CPUS"); fi
CMD+=(${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})
CMD+=("$SBATCH_SCRIPT" --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})

run_or_print "${CMD[@]}"
if ((DRY_RUN)); then
  # The script as comments, so that the whole output stays safe to paste into a shell.
  echo "# --- $SBATCH_SCRIPT (sbatch command-line options override its #SBATCH lines) ---"
  sed 's/^/# /' "$SBATCH_SCRIPT"
fi
