#!/usr/bin/env bash
# Issue #16's accelerator measurements, each step capped so that a failure or a slow compile leaves time for the
# next (the device lease is 15 minutes; 8B programs compile in 65-82 s on one H200). Two parts:
#   train      the issue's open goal (>= 40 % MFU): first `attention_kernels` (seconds: does "cudnn" agree with
#              the reference at the 8B shapes, and what does it save per layer), then the 8B-shaped train step with
#              remat keeping matmul outputs, so that no weight matmul runs twice (1.06x the model FLOPs instead of
#              1.39x), with the reference attention (one traced step and its optimized program kept:
#              $OUT/trace_step/), then the same step with cuDNN's flash attention (`--attention cudnn`). The policy
#              by the card's memory: "dots" (every matmul output; memory_8b: ~2.6 GB more per 512-token sample than
#              full remat) on a 141 GB card, "projections" (each projection's output once, base and adapter
#              summed: ~1.35 GB more) on an 80 GB one, where "dots" leaves room for batch 6 only. Note:
#              "dot_product" is NOT cuDNN (jax.nn's default implementation is XLA's own); the first lease's plan
#              named it by mistake.
#   inference  the 8B inference latency K = 0 vs K = 4 with the text layers unrolled (as evaluation decodes; four
#              programs of 36 unrolled layers, so its cap is the longest). The scanned layout was measured in the
#              first lease (`latency_8b --scan_layers`: 15.6 ms per answer token).
# Logs go to $OUT (or ./accelerator_logs). The device tool stops a call after 600 s, so run it as two calls, the
# train part first (it is what the issue still needs):
#     bash benchmarks/accelerator_run.sh train [batch] [cudnn_batch] [policy]  # attention check + two mfu_8b, <= 500 s
#                                  (by default "dots" at batch 16 on a 141 GB card, "projections" at 10 on an 80 GB one)
#     bash benchmarks/accelerator_run.sh inference                           # latency_8b, at most 240 s
# (`all`, the default, runs both in one go, where no such limit applies.)
# The first lease's results (README, "On one H200"): full remat 22.9 % MFU at batch 16, 26.3 % at 32.
set -u
part=${1:-all}
# The remat policy and batch of the steps, by the card's memory unless given. From the first lease (H200, full
# remat: 37.9 GiB of arguments, 7.8 GiB + 0.76 GiB per sample of temporaries) and memory_8b (per 1,024-token sample
# 16.3 GiB of temporaries with full remat, 21.5 with dots, 19.0 with projections: per 512-token sample dots keeps
# ~2.6 GiB more, projections ~1.35): ~46 GiB + 3.4 (dots) or 2.1 (projections) per sample. With
# XLA_PYTHON_CLIENT_MEM_FRACTION 0.92 an H200 (141 GB) holds ~121 GiB: dots at batch 16 (~100 GiB); an H100 (80 GB)
# ~73 GiB: dots only at batch 6 (~66 GiB), projections at 10 (~67 GiB).
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sed -n 1p | tr -dc 0-9)
default_batch=16 default_policy=dots
if [ -n "$gpu_mib" ] && [ "$gpu_mib" -lt 100000 ]; then default_batch=10 default_policy=projections; fi
batch=${2:-$default_batch}
cudnn_batch=${3:-$batch}
policy=${4:-$default_policy}
case "$part" in all|inference|train) ;; *) echo "unknown part '$part' (all | inference | train)" >&2; exit 2 ;; esac
out=${OUT:-accelerator_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/env.log"
if [ "$part" != inference ]; then
  timeout 80 python3 -m benchmarks.attention_kernels --batch "$batch" 2>&1 | tee "$out/attention_kernels.log"
  timeout 220 python3 -m benchmarks.mfu_8b --batch "$batch" --remat_policy "$policy" --trace_dir "$out/trace_step" \
      2>&1 | tee "$out/mfu_step.log"
  timeout 200 python3 -m benchmarks.mfu_8b --batch "$cudnn_batch" --remat_policy "$policy" --attention cudnn 2>&1 \
      | tee "$out/mfu_cudnn.log"
fi
if [ "$part" != train ]; then
  timeout 240 python3 -m benchmarks.latency_8b --repeats 8 2>&1 | tee "$out/latency.log"
fi
