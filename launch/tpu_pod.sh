#!/usr/bin/env bash
# Launch VITAL training on every host of a Cloud TPU pod slice (one process per TPU VM host).
#
# Usage:
#   TPU_NAME=vital-v5p-64 ZONE=us-east5-a CONFIG=configs/vital_qwen3vl_8b.py WORKDIR=/mnt/gcs/runs/vital-8b \
#     launch/tpu_pod.sh [extra flags passed to vital_jax.train, e.g. --config.curriculum.max_steps=1000]
#
# Optional environment:
#   PROJECT   gcloud project (default: gcloud's configured project)
#   REPO_DIR  checkout on the TPU hosts (default: ~/vital_jax; a leading ~/ is the home directory on the hosts)
#   SYNC=1    first copy this checkout (git archive of HEAD) to REPO_DIR on every host
#   SETUP=1   first run `$PYTHON -m pip install -e '.[tpu]'` in REPO_DIR on every host
#   PYTHON    the hosts' Python (default: python3, the only one stock TPU VM images have)
#   LOG_DIR   per-host log directory on the hosts (default: /tmp/vital_logs; ~/ as for REPO_DIR); each host writes
#             host_<hostname>.log
#
# Every host runs the same command; `vital_jax.train` calls `vital_jax.distributed.maybe_initialize_distributed()`,
# which on a TPU VM calls `jax.distributed.initialize()` without arguments (jax reads the pod topology from the TPU
# metadata), then builds the data/fsdp/tensor mesh from `config.mesh.shape` over all chips of the slice.
# Checkpoints and metrics go to WORKDIR, a directory every host sees at the same path: a bucket mounted on every
# host (gcsfuse) or a shared filesystem. A gs:// URL is refused: the workdir's lock, metrics and JSON files are
# written with local file operations. Only process 0 writes logs and exports. A host that still holds the TPU from an earlier run makes the new run fail with "TPU in use":
# stop that run first.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
: "${CONFIG:?set CONFIG (e.g. configs/vital_qwen3vl_8b.py)}"
: "${WORKDIR:?set WORKDIR (e.g. /mnt/gcs/runs/name: a bucket mounted on every host)}"
if [[ "$WORKDIR" == *://* ]]; then
  echo "[tpu_pod] WORKDIR=$WORKDIR is a URL: mount the bucket on every host (gcsfuse) and give the mount's path" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
REPO_DIR="${REPO_DIR:-~/vital_jax}"
LOG_DIR="${LOG_DIR:-/tmp/vital_logs}"
GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=("--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"})
TARGET=("$TPU_NAME" "${LOCATION[@]}")

# A path quoted for the remote shell (spaces and all), a leading ~/ still the remote user's home: "$HOME"/<rest>.
remote_path() {
  case "$1" in
    "~") printf '"$HOME"' ;;
    "~/"*) printf '"$HOME"/%q' "${1#"~/"}" ;;
    *) printf '%q' "$1" ;;
  esac
}
repo_dir="$(remote_path "$REPO_DIR")"
log_dir="$(remote_path "$LOG_DIR")"

if [[ "${SYNC:-0}" == "1" ]]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  archive="$(mktemp /tmp/vital_jax.XXXXXX.tar.gz)"
  git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  # `tpu-vm scp SRC... DEST`: the TPU is named only in DEST (a separate name would be read as a source file).
  "${GCLOUD[@]}" scp "${LOCATION[@]}" --worker=all "$archive" "$TPU_NAME:/tmp/vital_jax.tar.gz"
  "${GCLOUD[@]}" ssh "${TARGET[@]}" --worker=all \
    --command="mkdir -p $repo_dir && tar -xzf /tmp/vital_jax.tar.gz -C $repo_dir"
  rm -f "$archive"
fi

setup=""
if [[ "${SETUP:-0}" == "1" ]]; then
  setup="$(printf '%q' "$PYTHON") -m pip install -q -e '.[tpu]' && "
fi

# Quote the extra flags for the remote shell.
extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done

train="$(printf '%q' "$PYTHON") -m vital_jax.train --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$extra"
# pipefail: the command's exit status is training's, not tee's (which would report a failed run as a success).
remote="set -o pipefail && cd $repo_dir && ${setup}mkdir -p $log_dir"
remote+=" && $train 2>&1 | tee $log_dir/host_\$(hostname).log"

echo "[tpu_pod] $TPU_NAME ($ZONE), all workers: $train"
exec "${GCLOUD[@]}" ssh "${TARGET[@]}" --worker=all --command="$remote"
