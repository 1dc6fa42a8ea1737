#!/usr/bin/env bash
# Run `qwen-jax train` as N processes on this machine: a multi-host run in miniature.
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --num-processes=N --config=FILE --workdir=DIR [--port=P] [--dry-run]
         [--config.a.b=V ...] [-- EXTRA TRAIN ARGS...]

N=1 runs 'qwen-jax train --config=FILE --workdir=DIR' directly.
N>1 starts N background processes on localhost that find each other through
jax.distributed (the trainer reads these variables):
  QWEN_JAX_COORDINATOR=localhost:P  QWEN_JAX_NUM_PROCESSES=N  QWEN_JAX_PROCESS_ID=i
Process i logs to DIR/process_<i>.log. The launcher waits for all of them; when one
fails it stops the others and exits with that process's status.
Meant for CPU: every process would otherwise claim all of the machine's accelerators.

  --num-processes=N  number of processes (required)
  --port=P           coordinator port on localhost (default: 12355)
  --config=FILE      config file (required)
  --workdir=DIR      checkpoints and logs (required)
  --dry-run          print the commands, one per line, and run nothing
  --config.a.b=V     passed on to qwen-jax train, as is everything after --

Example:
  $PROG --num-processes=2 --config=configs/pretrain_tiny.py --workdir=runs/tiny-2proc
EOF
}

NUM='' PORT=12355 CONFIG='' WORKDIR='' DRY_RUN=0
EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --num-processes=*) NUM=$(value_of "$1") ;;
    --port=*) PORT=$(value_of "$1") ;;
    --config=*) CONFIG=$(value_of "$1") ;;
    --workdir=*) WORKDIR=$(value_of "$1") ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*=*) EXTRA+=("$1") ;;
    --) shift; EXTRA+=("$@"); break ;;
    --num-processes | --port | --config | --workdir | --config.*) no_value "$1" ;;
    *) die "unknown argument '$1' (train arguments go after --)" ;;
  esac
  shift
done
require "$NUM" --num-processes
require "$CONFIG" --config
require "$WORKDIR" --workdir
require_path_workdir "$WORKDIR"
require_positive_int "$NUM" --num-processes
require_positive_int "$PORT" --port
((PORT <= 65535)) || die "--port must be at most 65535, got '$PORT'"
[[ -f $CONFIG ]] || die "--config: no such file '$CONFIG'"
if ((!DRY_RUN)) && ! command -v qwen-jax >/dev/null; then
  die "qwen-jax is not on PATH: activate the virtual environment (source .venv/bin/activate) or pip install -e ."
fi

TRAIN=(qwen-jax train --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})

if ((NUM == 1)); then
  if ((DRY_RUN)); then join_quoted "${TRAIN[@]}"; echo; exit 0; fi
  exec "${TRAIN[@]}"
fi

COORDINATOR=localhost:$PORT

log_of() { printf '%s/process_%s.log' "$WORKDIR" "$1"; }

if ((DRY_RUN)); then
  join_quoted mkdir -p "$WORKDIR"; echo
  for ((i = 0; i < NUM; i++)); do
    # The same line the loop below runs, environment assignments first.
    echo "$(join_quoted QWEN_JAX_COORDINATOR="$COORDINATOR" QWEN_JAX_NUM_PROCESSES="$NUM" \
      QWEN_JAX_PROCESS_ID="$i" "${TRAIN[@]}") > $(quote "$(log_of "$i")") 2>&1 &"
  done
  echo wait
  exit 0
fi

mkdir -p "$WORKDIR"
PIDS=()
# Background processes of a script ignore Ctrl-C, so stop them ourselves.
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
}
on_signal() {
  echo "$PROG: interrupted, stopping all processes" >&2
  stop_all
  wait
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((i = 0; i < NUM; i++)); do
  QWEN_JAX_COORDINATOR=$COORDINATOR QWEN_JAX_NUM_PROCESSES=$NUM QWEN_JAX_PROCESS_ID=$i \
    "${TRAIN[@]}" >"$(log_of "$i")" 2>&1 &
  PIDS[i]=$!
  echo "$PROG: started process $i (pid ${PIDS[i]}), log $(log_of "$i")" >&2
done

# Poll rather than wait on the processes in order: a failed process leaves the others
# blocked in a collective, so notice any failure as soon as it happens.
left=$NUM
while ((left > 0)); do
  for ((i = 0; i < NUM; i++)); do
    pid=${PIDS[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    PIDS[i]=
    left=$((left - 1))
    if ((rc != 0)); then
      echo "$PROG: process $i failed with status $rc (log $(log_of "$i")); stopping the others" >&2
      stop_all
      wait || true
      exit "$rc"
    fi
  done
  if ((left > 0)); then sleep 0.5; fi
done
echo "$PROG: all $NUM processes finished" >&2
