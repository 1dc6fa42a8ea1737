#!/usr/bin/env bash
# Run `qwen-jax train` on every host of a Cloud TPU VM pod slice over `gcloud ssh`.
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --tpu=NAME --zone=ZONE [--project=PROJECT] --config=FILE --workdir=DIR
         [--repo-dir=DIR] [--setup=CMD | --no-setup] [--copy] [--dry-run]
         [--config.a.b=V ...] [-- EXTRA TRAIN ARGS...]

Runs, on every worker of TPU VM NAME at once (gcloud --worker=all):
  cd DIR && export PATH="\$HOME/.local/bin:\$PATH" && SETUP && qwen-jax train --config=FILE --workdir=...
JAX finds the other hosts of the slice by itself; no coordinator flags are needed.

  --tpu=NAME        TPU VM name (required)
  --zone=ZONE       its zone (required)
  --project=P       GCP project (default: gcloud's configured project)
  --config=FILE     config file, relative to DIR on the VM (required)
  --workdir=DIR     checkpoints and logs; every host must see it: a bucket mounted on every
                    host with Cloud Storage FUSE (e.g. /gcs/B/RUN), NFS or Filestore (required)
  --repo-dir=DIR    the qwen-jax checkout on each VM (default: ~/qwen-jax)
  --setup=CMD       shell command run in DIR before training
                    (default: pip install -e . "jax[tpu]"; the jax[tpu] extra brings libtpu)
  --no-setup        run no setup command
  --copy            first push this checkout to DIR on every worker (gcloud scp --recurse):
                    its top-level files and folders, less dot-files and git-ignored ones
                    (.git, .venv, *.egg-info, ...)
  --dry-run         print the commands, one per line, and run nothing
  --config.a.b=V    passed on to qwen-jax train, as is everything after --

gcloud needs your key in ssh-agent to reach several workers: ssh-add ~/.ssh/google_compute_engine
The training lives as long as this ssh session; run the launcher under tmux or nohup.

Example:
  $PROG --tpu=my-v5p-64 --zone=us-east5-a --config=configs/pretrain_0_8b.py \\
      --workdir=/gcs/my-bucket/runs/0_8b --copy -- --config.train.steps=20000
EOF
}

TPU='' ZONE='' PROJECT='' CONFIG='' WORKDIR='' COPY=0 DRY_RUN=0
# shellcheck disable=SC2088  # a literal ~, for the VM's shell to expand
REPO_DIR='~/qwen-jax'
SETUP='pip install -e . "jax[tpu]"'
EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --tpu=*) TPU=$(value_of "$1") ;;
    --zone=*) ZONE=$(value_of "$1") ;;
    --project=*) PROJECT=$(value_of "$1") ;;
    --config=*) CONFIG=$(value_of "$1") ;;
    --workdir=*) WORKDIR=$(value_of "$1") ;;
    --repo-dir=*) REPO_DIR=$(value_of "$1") ;;
    --setup=*) SETUP=$(value_of "$1") ;;
    --no-setup) SETUP= ;;
    --copy) COPY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*=*) EXTRA+=("$1") ;;
    --) shift; EXTRA+=("$@"); break ;;
    --tpu | --zone | --project | --config | --workdir | --repo-dir | --setup | --config.*) no_value "$1" ;;
    *) die "unknown argument '$1' (train arguments go after --)" ;;
  esac
  shift
done
require "$TPU" --tpu
require "$ZONE" --zone
require "$CONFIG" --config
require "$WORKDIR" --workdir
require_path_workdir "$WORKDIR"
require "$REPO_DIR" --repo-dir

# Flags common to every gcloud call; --worker=all runs the command on all hosts at once.
GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
GCLOUD_FLAGS+=(--worker=all)

# The shell command each worker runs. `pip install` as a non-root user puts the
# qwen-jax script in ~/.local/bin, which a non-interactive ssh shell lacks on its PATH.
REMOTE_DIR=$(remote_path "$REPO_DIR")
REMOTE="cd $REMOTE_DIR && export PATH=\"\$HOME/.local/bin:\$PATH\""
if [[ -n $SETUP ]]; then REMOTE+=" && $SETUP"; fi
REMOTE+=" && $(join_quoted qwen-jax train --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"

if ((COPY)); then
  # scp'ing the checkout folder itself would nest it (DIR/main/...) once DIR exists,
  # so create DIR and copy the top-level entries into it instead.
  SOURCES=()
  for entry in "$REPO_ROOT"/*; do
    [[ -e $entry ]] || continue
    if git -C "$REPO_ROOT" check-ignore -q -- "$(basename "$entry")" 2>/dev/null; then continue; fi
    SOURCES+=("$entry")
  done
  # A relative scp path is relative to the remote home; that avoids depending on how
  # this machine's scp (legacy or SFTP mode) treats a ~.
  SCP_DEST=$REPO_DIR
  # shellcheck disable=SC2088  # a literal ~/ prefix is what is being matched
  case $SCP_DEST in "~/"*) SCP_DEST=${SCP_DEST#\~/} ;; esac
  run_or_print gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --command="mkdir -p $REMOTE_DIR"
  run_or_print gcloud compute tpus tpu-vm scp --recurse "${SOURCES[@]}" "$TPU:$SCP_DEST" "${GCLOUD_FLAGS[@]}"
fi
run_or_print gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --command="$REMOTE"
