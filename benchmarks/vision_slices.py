"""Vision-tower memory and FLOPs with per-shard attention slices vs one global packing, same process.

Compiles the Qwen3-VL-8B vision tower (its config from configs/hf, abstract bf16 weights, nothing allocated) on
one CPU device for a packed batch of `--images` 448x448 images (784 patches each), once with one packing
(`num_slices=1`, attention scores (N, N) masked to block-diagonal) and once with one slice per image
(`num_slices=images`, what `distributed.global_vital_batch` gives when every batch shard holds one example), and
prints XLA's temporary-buffer size and FLOP estimate for both, with their ratios. `--depth` truncates the
tower (default 2 blocks: the attention share per block is what changes).

    python -m benchmarks.vision_slices                  # 8 images
    python -m benchmarks.vision_slices --images 32
    python -m benchmarks.vision_slices --quick          # 2 images of 8 x 8 patches, 1 block (the CI smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import quick_sizes
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.vision import Qwen3VLVisionModel, vision_inputs


QUICK = dict(images=2, grid=8, depth=1)


def compile_tower(config, params, pixels, inputs) -> dict:
    model = Qwen3VLVisionModel(config)
    t0 = time.perf_counter()
    compiled = jax.jit(model.apply).lower({"params": params}, pixels, inputs).compile()
    seconds = time.perf_counter() - t0
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"temp": float(compiled.memory_analysis().temp_size_in_bytes), "flops": float(analysis.get("flops", 0.0)),
            "compile_s": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone_config", default="configs/hf/qwen3_vl_8b_instruct")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--grid", type=int, default=28, help="patch grid side (28 = a 448x448 image)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the CI smoke test")
    args = p.parse_args()
    args = quick_sizes(args, QUICK)

    vision = Qwen3VLConfig.from_pretrained(args.backbone_config, dtype="bfloat16", param_dtype="bfloat16").vision
    # frame_attention off: this compares the two masked layouts for images of any size (equal-size frames would
    # otherwise attend per frame in both, and the comparison would be of one program with itself).
    vision = dataclasses.replace(vision, depth=args.depth, frame_attention=False,
                                 deepstack_visual_indexes=tuple(i for i in vision.deepstack_visual_indexes
                                                                if i < args.depth))
    grids = [(1, args.grid, args.grid)] * args.images
    one = vision_inputs(grids, vision)
    # One slice per image: each image's patches alone, its segment renumbered 1 (slices never see each other).
    per_image = vision_inputs(grids[:1], vision)
    sliced = dataclasses.replace(
        one, segment_ids=np.tile(per_image.segment_ids, args.images), num_slices=args.images)
    n = one.num_patches
    pixels = jax.ShapeDtypeStruct((n, vision.patch_dim), jnp.float32)
    params = jax.eval_shape(lambda: Qwen3VLVisionModel(vision).init(
        jax.random.PRNGKey(0), jnp.zeros((per_image.num_patches, vision.patch_dim)), grids[:1]))["params"]

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Qwen3-VL-8B vision tower, {args.depth} blocks, "
          f"{args.images} images x {args.grid * args.grid} patches = {n} packed patches, bf16")
    results = {}
    for name, inputs in (("one packing (N x N scores)", one), (f"{args.images} slices", sliced)):
        results[name] = r = compile_tower(vision, params, pixels, inputs)
        print(f"  {name:28s} temp {r['temp'] / 2**20:9.1f} MiB | {r['flops'] / 1e9:9.1f} GFLOP | "
              f"compiled in {r['compile_s']:.1f}s")
    (_, a), (_, b) = results.items()
    print(f"ratio one packing / slices: temp {a['temp'] / b['temp']:.2f}x, FLOPs {a['flops'] / b['flops']:.2f}x")


if __name__ == "__main__":
    main()
