#!/usr/bin/env bash
# The accelerator measurements of issue #16 item 5 in one run (each step capped so that a failure or a slow
# compile leaves time for the next): the 8B-shaped train step's MFU at two batch sizes and the 8B inference
# latency K = 0 vs K = 4, with the text layers unrolled (as evaluation decodes) and scanned (as trained).
# About 9 minutes on one H200 when every step completes. Logs go to $OUT (or ./accelerator_logs).
#     bash benchmarks/accelerator_run.sh [mfu_batch_first mfu_batch_second]
set -u
out=${OUT:-accelerator_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
first=${1:-16}
second=${2:-32}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/env.log"
timeout 180 python3 -m benchmarks.mfu_8b --batch "$first" --steps 5 2>&1 | tee "$out/mfu_b$first.log"
timeout 150 python3 -m benchmarks.latency_8b --repeats 8 2>&1 | tee "$out/latency.log"
timeout 120 python3 -m benchmarks.latency_8b --repeats 8 --scan_layers 2>&1 | tee "$out/latency_scan.log"
timeout 130 python3 -m benchmarks.mfu_8b --batch "$second" --steps 5 2>&1 | tee "$out/mfu_b$second.log"
