"""How fast could `peer_train_step`'s step run on this machine? Its time against a floor from this CPU's measured
matmul rate, in the same process (issue #16: is the 1.5x train-step goal within reach here?).

    python -m benchmarks.train_floor [--steps 5 --warmup 8 --quick]

Both sides are `benchmarks.peer_train_step`'s (vital_jax's jitted `train_step`; transformers + peft), at its sizes.
The step's work is counted two ways: the model FLOPs of `vital.accounting.train_step_flops` (what any
implementation must compute: forward and activation gradients through the frozen backbone, weight gradients of
the adapters, decoder and heads, the frozen vision tower forward) and XLA's executed dot FLOPs of the compiled
step (`benchmarks.xla_flops`). The floor is the model FLOPs at the best float32 matmul rate XLA reaches on this
machine (`benchmarks.inference_floor.matmul_gflops`; `--quick`: on small matrices, a rate that means nothing);
`transformers / floor` is the most any implementation could gain over transformers + peft here. The last line
prints it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import xla_flops
from benchmarks.inference_floor import QUICK_MATMUL_SIDE, matmul_gflops
from benchmarks.machine import apply_host_setting
from benchmarks.peer_train_step import PEER
from benchmarks.train_step import QUICK, build_hf, jax_step, synthetic, torch_step
from vital_jax.vital import accounting


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8, help="untimed steps of each side after the first call (as "
                   "peer_train_step: both sides speed up over their first ~8 steps here)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 timed step, for the CI smoke test")
    args = p.parse_args(argv)
    sizes, steps, warmup = (QUICK, 1, 0) if args.quick else (PEER, args.steps, args.warmup)
    print(apply_host_setting(), file=sys.stderr)
    with tempfile.TemporaryDirectory() as path:
        hf_backbone, hf_decoder = build_hf(path, sizes)
        vis = hf_backbone.config.vision_config
        data = synthetic(vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2, sizes=sizes)
        j_run, j_out = jax_step(path, data, sizes)
        t_run, _, _ = torch_step(hf_backbone, hf_decoder, data, sizes, "peft")
    times = {"jax": [], "torch": []}
    untimed = 1 + warmup  # the first call of each compiles, the next `warmup` reach the steady state
    for i in range(untimed + steps):
        for name, run in (("jax", j_run), ("torch", t_run)):
            t0 = time.perf_counter()
            run()
            if i >= untimed:
                times[name].append((time.perf_counter() - t0) * 1e3)
    j_ms, t_ms = float(np.median(times["jax"])), float(np.median(times["torch"]))

    model = j_out["model"]
    b, prompt_len = data["prompt_ids"].shape
    num_patches = data["pixel_patches"].shape[0]
    model_flops = accounting.train_step_flops(model, accounting.account(model), b, prompt_len, num_patches,
                                              sizes.answer, sizes.step_chain)
    dot_flops = xla_flops.matmul_flops(j_out["lower"]().compile().as_text())
    gflops = matmul_gflops(prompt_len * b, 1, QUICK_MATMUL_SIDE) if args.quick else matmul_gflops(prompt_len * b, 3)
    floor_ms = model_flops / gflops / 1e6
    print(f"batch {b}, K {sizes.latent_steps}, prompt {prompt_len} tokens, {num_patches} patches, answer "
          f"{sizes.answer}, step chains {sizes.step_chain}, LoRA r{sizes.lora_rank}; float32, jax "
          f"{jax.devices()[0].platform}")
    print(f"this machine: matmul {gflops:.0f} GFLOP/s")
    print(f"work per step: model {model_flops / 1e9:.2f} GFLOP (vital.accounting), XLA's dots "
          f"{dot_flops / 1e9:.2f} GFLOP ({dot_flops / model_flops:.2f}x)")
    print(f"vital_jax {j_ms:.1f} ms/step ({model_flops / j_ms / 1e6:.0f} GFLOP/s), transformers + peft "
          f"{t_ms:.1f} ms/step ({model_flops / t_ms / 1e6:.0f} GFLOP/s), floor {floor_ms:.1f} ms")
    print(f"ratio today (transformers / vital_jax): {t_ms / j_ms:.2f}x")
    print(f"most any implementation could reach here (transformers / floor): {t_ms / floor_ms:.2f}x")


if __name__ == "__main__":
    main()
