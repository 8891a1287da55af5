#!/usr/bin/env bash
# Issue #16's accelerator measurements in one run, each step capped so that a failure or a slow compile leaves
# time for the next (the device lease is 15 minutes; 8B programs compile in 65-82 s on one H200). In order of what
# is least known: the 8B inference latency K = 0 vs K = 4 with the text layers unrolled (as evaluation decodes;
# four programs of 36 unrolled layers, so its cap is the longest), the 8B-shaped train step's MFU with remat keeping
# the matmul outputs (`--remat_policy dots`, 1.05x the model FLOPs instead of 1.39x; memory_8b puts it at ~2.6 GB
# more per 512-token sample than full remat), and the step with cuDNN attention. The scanned decode layout was
# measured in the first lease (`latency_8b --scan_layers`: 15.6 ms per answer token). The `dots` run also keeps
# one traced step and its optimized program (`mfu_8b --trace_dir`: $OUT/trace_dots/step.trace.json.gz and
# step_hlo.txt.gz) and prints its top kernels, so the lease leaves the step's time by kernel to study here
# afterwards. About 11 minutes at most.
# Logs go to $OUT (or ./accelerator_logs). The device tool stops a call after 600 s, so run it as two calls:
#     bash benchmarks/accelerator_run.sh inference                       # latency_8b, at most 240 s
#     bash benchmarks/accelerator_run.sh train [dots_batch] [dot_product_batch]   # the two mfu_8b runs, <= 420 s
# (`all`, the default, runs both in one go, where no such limit applies.)
# The first lease's results (README, "On one H200"): full remat 22.9 % MFU at batch 16, 26.3 % at 32.
set -u
part=${1:-all}
dots_batch=${2:-16}
cudnn_batch=${3:-32}
case "$part" in all|inference|train) ;; *) echo "unknown part '$part' (all | inference | train)" >&2; exit 2 ;; esac
out=${OUT:-accelerator_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/env.log"
if [ "$part" != train ]; then
  timeout 240 python3 -m benchmarks.latency_8b --repeats 8 2>&1 | tee "$out/latency.log"
fi
if [ "$part" != inference ]; then
  timeout 220 python3 -m benchmarks.mfu_8b --batch "$dots_batch" --remat_policy dots --trace_dir "$out/trace_dots" \
      2>&1 | tee "$out/mfu_dots.log"
  timeout 200 python3 -m benchmarks.mfu_8b --batch "$cudnn_batch" --attention dot_product 2>&1 \
      | tee "$out/mfu_cudnn.log"
fi
