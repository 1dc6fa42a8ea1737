#!/usr/bin/env bash
# Submit `qwen-jax train` as an xpk workload on a GKE TPU cluster (one or more slices).
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --cluster=C --workload=W --tpu-type=TYPE --docker-image=IMG
         --config=FILE --workdir=DIR [--num-slices=N] [--zone=Z] [--project=P]
         [--xpk-arg=ARG ...] [--dry-run] [--config.a.b=V ...] [-- EXTRA TRAIN ARGS...]

Runs:
  xpk workload create --cluster=C --workload=W --tpu-type=TYPE --num-slices=N
      --docker-image=IMG [--zone=Z] [--project=P] [ARG ...]
      --command='qwen-jax train --config=FILE --workdir=...'
xpk starts the command on every host of every slice; JAX finds its peers by itself.

  --cluster=C       xpk/GKE cluster name (required)
  --workload=W      workload name: lowercase letters, digits and '-', starting with a
                    letter, at most 40 characters (required)
  --tpu-type=TYPE   slice type, e.g. v5p-128, v5litepod-256, v6e-256 (required)
  --num-slices=N    number of slices, joined over DCN (default: 1)
  --docker-image=IMG
                    image with this repository installed (qwen-jax on PATH); the command
                    runs in its working directory, so --config is relative to that (required)
  --zone=Z, --project=P
                    GCP zone and project (default: gcloud's configured ones)
  --config=FILE     config file, inside the image (required)
  --workdir=DIR     checkpoints and logs; every host must see it: a bucket mounted on every
                    host with Cloud Storage FUSE (e.g. /gcs/B/RUN), NFS or Filestore (required)
  --xpk-arg=ARG     one more argument for xpk, e.g. --xpk-arg=--max-restarts=3 (repeatable)
  --dry-run         print the command and run nothing
  --config.a.b=V    passed on to qwen-jax train, as is everything after --

Example:
  $PROG --cluster=my-cluster --workload=qwen-0-8b --tpu-type=v5p-128 --num-slices=2 \\
      --docker-image=us-docker.pkg.dev/my-proj/qwen/qwen-jax:latest \\
      --config=configs/pretrain_0_8b.py --workdir=/gcs/my-bucket/runs/0_8b
EOF
}

CLUSTER='' WORKLOAD='' TPU_TYPE='' NUM_SLICES=1 IMAGE='' ZONE='' PROJECT='' CONFIG='' WORKDIR='' DRY_RUN=0
XPK_ARGS=() EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --cluster=*) CLUSTER=$(value_of "$1") ;;
    --workload=*) WORKLOAD=$(value_of "$1") ;;
    --tpu-type=*) TPU_TYPE=$(value_of "$1") ;;
    --num-slices=*) NUM_SLICES=$(value_of "$1") ;;
    --docker-image=*) IMAGE=$(value_of "$1") ;;
    --zone=*) ZONE=$(value_of "$1") ;;
    --project=*) PROJECT=$(value_of "$1") ;;
    --config=*) CONFIG=$(value_of "$1") ;;
    --workdir=*) WORKDIR=$(value_of "$1") ;;
    --xpk-arg=*) XPK_ARGS+=("$(value_of "$1")") ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*=*) EXTRA+=("$1") ;;
    --) shift; EXTRA+=("$@"); break ;;
    --cluster | --workload | --tpu-type | --num-slices | --docker-image | --zone | --project | \
      --config | --workdir | --xpk-arg | --config.*) no_value "$1" ;;
    *) die "unknown argument '$1' (train arguments go after --)" ;;
  esac
  shift
done
require "$CLUSTER" --cluster
require "$WORKLOAD" --workload
require "$TPU_TYPE" --tpu-type
require "$IMAGE" --docker-image
require "$CONFIG" --config
require "$WORKDIR" --workdir
require_path_workdir "$WORKDIR"
require_positive_int "$NUM_SLICES" --num-slices
# xpk's own rule for workload names (they become Kubernetes object names).
if [[ ! $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || ((${#WORKLOAD} > 40)); then
  die "--workload must be lowercase letters, digits and '-', start with a letter," \
    "end with a letter or digit, and be at most 40 characters; got '$WORKLOAD'"
fi

CMD=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
  --num-slices="$NUM_SLICES" --docker-image="$IMAGE")
if [[ -n $ZONE ]]; then CMD+=(--zone="$ZONE"); fi
if [[ -n $PROJECT ]]; then CMD+=(--project="$PROJECT"); fi
CMD+=(${XPK_ARGS[@]+"${XPK_ARGS[@]}"})
CMD+=(--command="$(join_quoted qwen-jax train --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})")
run_or_print "${CMD[@]}"
