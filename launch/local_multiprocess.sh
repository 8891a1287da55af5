#!/usr/bin/env bash
# Run N VITAL training processes on this machine (a multi-host rehearsal on one box, or several GPUs driven by one
# process each), coordinated over 127.0.0.1.
#
# Usage:
#   NUM_PROCESSES=2 CONFIG=configs/demo.py WORKDIR=/tmp/vital_run launch/local_multiprocess.sh [extra train flags]
#
# Optional environment:
#   NUM_PROCESSES     processes to start (default 2)
#   DEVICES_PER_PROC  CPU devices per process when running on CPU (default 1; sets
#                     XLA_FLAGS=--xla_force_host_platform_device_count; ignored for GPUs)
#   GPUS_PER_PROC     on a GPU machine, give process i the GPUs [i*G, (i+1)*G) via VITAL_LOCAL_DEVICE_IDS
#   PORT              coordinator port (default: a free port)
#   LOG_DIR           per-process logs process_<i>.log (default: $WORKDIR/logs); process 0's is shown here
#   MODULE            python module to run (default vital_jax.train, which trains either method); it must call
#                     vital_jax.distributed.maybe_initialize_distributed() (pretrain and study are one process)
#
# Each process gets VITAL_COORDINATOR=127.0.0.1:$PORT, VITAL_NUM_PROCESSES and VITAL_PROCESS_ID, read by
# `vital_jax.distributed.maybe_initialize_distributed()`. CPU processes use gloo collectives. Ctrl-C stops all of
# them; if one fails the others are stopped too.
set -euo pipefail

: "${CONFIG:?set CONFIG (e.g. configs/demo.py)}"
: "${WORKDIR:?set WORKDIR}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROC="${DEVICES_PER_PROC:-1}"
for var in NUM_PROCESSES DEVICES_PER_PROC ${GPUS_PER_PROC:+GPUS_PER_PROC}; do
  if [[ ! "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "[local_multiprocess] $var='${!var}': set a positive integer" >&2
    exit 2
  fi
done
MODULE="${MODULE:-vital_jax.train}"
# Relative paths are the caller's: anchor them before the `cd` to the repository root below (a CONFIG that is not
# there, e.g. configs/demo.py from elsewhere, stays relative to the repository).
[[ "$WORKDIR" == /* || "$WORKDIR" == *://* ]] || WORKDIR="$PWD/$WORKDIR"
if [[ "$CONFIG" != /* && -e "${CONFIG%%:*}" ]]; then CONFIG="$PWD/$CONFIG"; fi
LOG_DIR="${LOG_DIR:-$WORKDIR/logs}"
[[ "$LOG_DIR" == /* ]] || LOG_DIR="$PWD/$LOG_DIR"
PORT="${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM EXIT

echo "[local_multiprocess] $NUM_PROCESSES processes, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env_vars=(VITAL_COORDINATOR="127.0.0.1:$PORT" VITAL_NUM_PROCESSES="$NUM_PROCESSES" VITAL_PROCESS_ID="$i")
  if [[ -n "${GPUS_PER_PROC:-}" ]]; then
    ids=$(seq -s, $((i * GPUS_PER_PROC)) $(((i + 1) * GPUS_PER_PROC - 1)))
    env_vars+=(VITAL_LOCAL_DEVICE_IDS="$ids")
  else
    env_vars+=(XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROC")
  fi
  env "${env_vars[@]}" python -m "$MODULE" --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
# Show process 0's log here as it grows.
tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
tail_pid=$!
disown "$tail_pid"  # not a job `wait -n` waits for

# Whichever process ends first with an error stops the others now (process 0 may be blocked in a collective or in
# jax.distributed.initialize waiting for the failed one, and would otherwise hold them until its own timeout).
status=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if ! wait -n; then
    status=1
    cleanup
  fi
done
kill "$tail_pid" 2>/dev/null || true
trap - EXIT
if [[ $status -ne 0 ]]; then echo "[local_multiprocess] a process failed; see $LOG_DIR" >&2; fi
exit $status
