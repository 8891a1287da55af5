"""Per-device memory of the 8B VITAL train step, from XLA's own buffer assignment, without any weights.

Lowers and compiles `train_step` for Qwen3-VL-8B (+ LoRA r=64) with the Qwen3-1.7B decoder, K = 4, on a
simulated 8-device CPU mesh, with every input abstract (ShapeDtypeStructs carrying NamedShardings): nothing of
size 8B is ever allocated. Backbone params bf16, LoRA adapters and decoder fp32 (master weights) with bf16
compute, decoder layers as one `nn.scan` (`scan_layers`, as configs/vital_qwen3vl_8b.py) with remat on for the
layers and the latent steps (`--loop_layers` compiles the unrolled form instead, whose remat does not bound
memory: XLA schedules every layer's recomputation early). Two layouts: FSDP over 8 (mesh (1, 8, 1)) and data
parallel (mesh (8, 1, 1)). Global batch 8 (1 per device), prompt 1024 tokens incl. one 448x448 image (196 tokens),
answer 32, step chains 64 tokens. Each compiled program also reports its executed matmul FLOPs
(`benchmarks.xla_flops`: every dot of every device's program, scan bodies times their trip counts) against the
model FLOPs of `vital.accounting.train_step_flops`: the ratio shows recompute (remat re-runs each layer's forward:
4N -> 6N per token for the frozen backbone, 6N -> 8N for adapters) and any hidden waste.

    python -m benchmarks.memory_8b                     # full depth (36 + 28 layers; ~2-3 min per mesh)
    python -m benchmarks.memory_8b --layers 2 4        # compile truncated models and extrapolate per layer

With `--layers N1 N2` three programs compile per layout: (backbone N1, decoder N1), (N2, N1), (N1, N2); each
memory figure is then fit as a + b_backbone * L_backbone + b_decoder * L_decoder and evaluated at (36, 28).
The vision tower always has its full 27 blocks.

Caveat: this is the CPU backend's buffer assignment. XLA:CPU has no bf16 matmul: it converts bf16 weights to f32,
and its while-loop-invariant code motion then hoists that conversion of the *whole* stacked (L, ...) weight
array out of the layer scan, a full f32 copy of the backbone that GPU/TPU backends (native bf16 dots) never make.
The benchmark therefore disables that one pass on CPU (`--keep_licm` keeps it). Temps remain indicative (XLA:CPU
also keeps some other bf16 intermediates in f32 and fuses differently); argument/output sizes are exact.
"""

from __future__ import annotations

import os

import argparse  # noqa: E402
import sys  # noqa: E402

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--keep_licm" not in sys.argv:
    os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import xla_flops, xla_memory  # noqa: E402
from benchmarks.mfu_8b import add_model_arguments, paper_model, synthetic_batch  # noqa: E402
from vital_jax import distributed, sharding  # noqa: E402
from vital_jax.vital import accounting, trainable  # noqa: E402
from vital_jax.vital.train_step import init_train_state, train_step  # noqa: E402

GIB = 2**30
H100_BYTES = 80e9  # "80 GB" H100; ~79.1 GiB usable, less the CUDA context and XLA's reserve
FIELDS = ("argument", "output", "alias", "temp", "generated_code")
FLOP_FIELDS = ("matmul_flops", "model_flops")  # global, per step
FULL_BACKBONE_LAYERS, FULL_DECODER_LAYERS = 36, 28


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: x if isinstance(s, type(trainable.MASKED)) else
                        jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings, is_leaf=lambda x: isinstance(x, type(trainable.MASKED)))


def compile_memory(args, mesh_shape, backbone_layers: int, decoder_layers: int) -> dict:
    """Lower + compile the step for abstract inputs on `mesh_shape`; returns per-device bytes and timings."""
    model = paper_model(args, remat=True, scan_layers=not args.loop_layers, remat_policy=args.remat_policy,
                        layers=(backbone_layers, decoder_layers))
    optimizer = trainable.make_optimizer(2e-5)
    params = model.abstract_params()
    state, frozen = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    np_batch = synthetic_batch(model.backbone_config, args.batch, args.prompt_len, 28, args.answer_len, args.k,
                               args.step_len, 1152)
    mesh = sharding.make_mesh(mesh_shape)
    # As training builds it: each batch shard's patches in its own slice (~40 MB: the only concrete inputs).
    batch = distributed.global_vital_batch(np_batch, model.backbone_config, mesh)
    state_sh, _ = sharding.tree_shardings(state, mesh)
    frozen_sh, _ = sharding.tree_shardings(frozen, mesh)
    batch_sh, _ = sharding.batch_shardings(batch, mesh)
    args_abstract = (abstract(state, state_sh), abstract(frozen, frozen_sh), abstract(batch, batch_sh))
    step = jax.jit(functools.partial(train_step, model, optimizer), donate_argnums=(0,),
                   in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None))
    compiled, measured = xla_memory.compile_measured(step, args_abstract, FIELDS, mesh)
    # Executed dots of every device's program (each computes its shards) against the model FLOPs of the step.
    measured["matmul_flops"] = xla_flops.matmul_flops(compiled.as_text()) * mesh.size
    measured["model_flops"] = accounting.train_step_flops(
        model, accounting.account(model), args.batch, args.prompt_len, args.batch * 28 * 28, args.answer_len,
        args.step_len)
    return measured


def peak(m: dict) -> float:
    """Live bytes at the step's peak: inputs + outputs (donated state aliases its output) + temps + code."""
    return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]


def fit(points: dict, target: tuple[int, int]) -> dict:
    """Solve m = a + b_bb * L_bb + b_dec * L_dec per field from three (L_bb, L_dec) points; evaluate at target."""
    keys = list(points)
    a = np.array([[1.0, lb, ld] for lb, ld in keys])
    out = {}
    for f in FIELDS + FLOP_FIELDS:
        coef = np.linalg.solve(a, np.array([points[k][f] for k in keys]))
        out[f] = float(coef @ np.array([1.0, *target]))
        out[f"{f}_per_backbone_layer"], out[f"{f}_per_decoder_layer"] = float(coef[1]), float(coef[2])
    return out


def report(name: str, m: dict, note: str = "") -> None:
    p = peak(m)
    fits = "fits" if p < H100_BYTES else "does NOT fit"
    print(f"  {name}: argument {m['argument'] / GIB:6.2f} GiB | output {m['output'] / GIB:6.2f} GiB | "
          f"alias {m['alias'] / GIB:6.2f} GiB | temp {m['temp'] / GIB:6.2f} GiB | code "
          f"{m['generated_code'] / 2**20:5.1f} MiB -> peak {p / GIB:6.2f} GiB/device: {fits} in an 80 GB H100"
          f" (headroom {(H100_BYTES - p) / GIB:+.1f} GiB){note}")
    print(f"    executed matmul FLOPs {m['matmul_flops']:.4g} = {m['matmul_flops'] / m['model_flops']:.2f}x the model "
          f"FLOPs of vital.accounting ({m['model_flops']:.4g}, which count no remat recompute)")


def main():
    p = argparse.ArgumentParser()
    add_model_arguments(p, layer_pairs=True)
    p.add_argument("--batch", type=int, default=8, help="global batch (over 8 devices)")
    p.add_argument("--prompt_len", type=int, default=1024)
    p.add_argument("--answer_len", type=int, default=32)
    p.add_argument("--step_len", type=int, default=64)
    p.add_argument("--meshes", default="fsdp,data", help="comma list of: fsdp (1,8,1), data (8,1,1)")
    p.add_argument("--loop_layers", action="store_true", help="unrolled decoder layers instead of nn.scan")
    p.add_argument("--remat_policy", default="full",
                   help="what remat keeps: full, dots or projections (Qwen3Config.remat_policy)")
    p.add_argument("--keep_licm", action="store_true",
                   help="keep XLA:CPU's while-loop-invariant code motion (hoists f32 copies of all bf16 weights)")
    args = p.parse_args()

    meshes = {"fsdp": (1, 8, 1), "data": (8, 1, 1)}
    print(f"jax {jax.__version__}, {jax.device_count()} simulated {jax.devices()[0].platform} devices; "
          f"global batch {args.batch}, prompt {args.prompt_len} (196 image tokens), answer {args.answer_len}, "
          f"steps {args.k} x {args.step_len} tokens; bf16 backbone, fp32 LoRA and decoder (bf16 compute), remat on "
          f"({args.remat_policy}), "
          f"{'unrolled' if args.loop_layers else 'scanned'} layers")
    target = (FULL_BACKBONE_LAYERS, FULL_DECODER_LAYERS)
    for mesh_name in args.meshes.split(","):
        shape = meshes[mesh_name]
        print(f"mesh {mesh_name} {shape} (data, fsdp, tensor):")
        if args.layers is None:
            m = compile_memory(args, shape, *target)
            print(f"  compiled full model in {m['lower_s']:.0f}s lower + {m['compile_s']:.0f}s compile")
            report("36 + 28 layers (measured)", m)
            continue
        n1, n2 = args.layers
        points = {}
        for lb, ld in ((n1, n1), (n2, n1), (n1, n2)):
            m = compile_memory(args, shape, lb, ld)
            points[(lb, ld)] = m
            report(f"backbone {lb:2d} + decoder {ld:2d} layers (measured, {m['lower_s'] + m['compile_s']:.0f}s)",
                   m)
        est = fit(points, target)
        print(f"  per backbone layer: argument {est['argument_per_backbone_layer'] / 2**20:.0f} MiB, temp "
              f"{est['temp_per_backbone_layer'] / 2**20:.0f} MiB; per decoder layer: argument "
              f"{est['argument_per_decoder_layer'] / 2**20:.0f} MiB, temp "
              f"{est['temp_per_decoder_layer'] / 2**20:.0f} MiB")
        report("36 + 28 layers (EXTRAPOLATED linearly per layer)", est)


if __name__ == "__main__":
    main()
