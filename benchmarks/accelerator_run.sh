#!/usr/bin/env bash
# Issue #16's accelerator measurements in one run, each step capped so that a failure or a slow compile leaves
# time for the next (the device lease is 15 minutes; 8B programs compile in 65-82 s on one H200). In order of what
# is least known: the 8B inference latency K = 0 vs K = 4 with the text layers unrolled (as evaluation decodes;
# four programs of 36 unrolled layers, so its cap is the longest), the 8B-shaped train step's MFU with remat keeping
# the matmul outputs (`--remat_policy dots`, 1.05x the model FLOPs instead of 1.39x; memory_8b puts it at ~2.6 GB
# more per 512-token sample than full remat), and the step with cuDNN attention. The scanned decode layout was
# measured in the first lease (`latency_8b --scan_layers`: 15.6 ms per answer token). About 11 minutes at most.
# Logs go to $OUT (or ./accelerator_logs).
#     bash benchmarks/accelerator_run.sh [dots_batch] [dot_product_batch]
# The first lease's results (README, "On one H200"): full remat 22.9 % MFU at batch 16, 26.3 % at 32.
set -u
out=${OUT:-accelerator_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
dots_batch=${1:-16}
cudnn_batch=${2:-32}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/env.log"
timeout 240 python3 -m benchmarks.latency_8b --repeats 8 2>&1 | tee "$out/latency.log"
timeout 200 python3 -m benchmarks.mfu_8b --batch "$dots_batch" --remat_policy dots 2>&1 | tee "$out/mfu_dots.log"
timeout 200 python3 -m benchmarks.mfu_8b --batch "$cudnn_batch" --attention dot_product 2>&1 | tee "$out/mfu_cudnn.log"
