"""Throughput and MFU of the VITAL train step at the paper's model shapes (Qwen3-VL-8B + LoRA, Qwen3-1.7B
decoder, K = 4), with random weights, on whatever accelerator JAX sees.

    python -m benchmarks.mfu_8b [--backbone_config=configs/hf/qwen3_vl_8b_instruct]
        [--decoder_config=configs/hf/qwen3_1p7b] [--batch 4 --prompt_len 512 --grid 28 --steps 5]
        [--layers N]   # truncate both LMs to N layers (a quick check of the script)
        [--quick]      # the phantom VLM's towers at one layer, small batch: the CI smoke test of the script
        [--trace_dir DIR]  # then one more step under jax.profiler, its trace and program kept in DIR

MFU = model FLOPs per step / step time / peak, with the model FLOPs of `vital.accounting.train_step_flops` (the
same count training logs as `perf/mfu`). The executed matmul FLOPs of the optimized program (`benchmarks.xla_flops`,
rematerialisation included) are printed beside them where XLA keeps its dots as dots (CPU, TPU).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import xla_flops as xla_flops_lib
from vital_jax import assets
from vital_jax.layers.attention import check_backend
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.observability import peak_flops_per_device
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.vital import accounting, trainable
from vital_jax.vital.batch import from_numpy
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel
from vital_jax.vital.train_step import init_train_state, train_step

def random_params(abstract: dict, seed: int = 0) -> dict:
    """Random weights straight on the device in each leaf's dtype (normal * 0.02; ones for norm scales).

    One small jitted generator per distinct (shape, dtype, kind): layers repeat shapes, so only a few dozen
    programs compile, each fast (one program for the whole tree compiles for minutes on GPU).
    """

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def make(key, shape, dtype, kind):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        scale = 0.001 if kind == "small" else 0.02
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    out = {}
    for i, (name, spec) in enumerate(sorted(flatten(abstract).items())):
        kind = "ones" if name.endswith("scale") else ("small" if name.endswith("lora_b") else "normal")
        out[name] = make(jax.random.PRNGKey(seed * 100003 + i), tuple(spec.shape), jnp.dtype(spec.dtype), kind)
    return unflatten(out)


def synthetic_batch(cfg: Qwen3VLConfig, batch: int, prompt_len: int, grid: int, answer_len: int, k_max: int,
                    step_len: int, roi_dim: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    n_img = grid * grid // 4
    text = prompt_len - n_img - 2
    if text < 1:
        raise ValueError(f"prompt_len {prompt_len} too short for {n_img} image tokens")
    row = ([int(t) for t in rng.randint(0, 1000, text // 2)] + [cfg.vision_start_token_id]
           + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
           + [int(t) for t in rng.randint(0, 1000, text - text // 2)])
    roi = rng.randn(batch, roi_dim).astype(np.float32)
    return dict(
        prompt_ids=np.tile(np.asarray(row, np.int32), (batch, 1)), prompt_valid=np.ones((batch, prompt_len), bool),
        pixel_patches=rng.randn(batch * grid * grid, cfg.vision.patch_dim).astype(np.float32),
        image_grid_thw=np.tile(np.asarray([1, grid, grid], np.int32), (batch, 1)),
        answer_ids=rng.randint(0, 1000, (batch, answer_len)).astype(np.int32),
        answer_valid=np.ones((batch, answer_len), bool),
        latent_steps=np.full((batch,), k_max, np.int32),
        step_ids=rng.randint(0, 1000, (batch, k_max, step_len)).astype(np.int32),
        step_valid=np.ones((batch, k_max, step_len), bool),
        roi_feature=roi / np.linalg.norm(roi, axis=1, keepdims=True),
        example_valid=np.ones((batch,), bool))


def device_pids(events: list[dict]) -> set:
    """The process ids of a trace's accelerator lanes: the processes named "/device:..." (the host's are
    "/host:CPU")."""
    return {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and str(e.get("args", {}).get("name", "")).startswith("/device:")}


def device_kernel_ms(events: list[dict]) -> tuple[collections.Counter, int]:
    """(ms summed per event name over the trace's accelerator processes (`device_pids`), how many such processes)
    from a perfetto trace's complete ("X") events."""
    lanes = device_pids(events)
    by_name = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in lanes:
            by_name[e["name"]] += e.get("dur", 0.0) / 1000.0
    return by_name, len(lanes)


def trace_one_step(compiled, state, frozen, batch, trace_dir: str, top: int = 12):
    """One more step under `jax.profiler`, kept for a later look at where an accelerator's step time goes:
    `trace_dir/step.trace.json.gz` (the perfetto trace: the device's kernels by name, with their HLO ops) and
    `trace_dir/step_hlo.txt.gz` (the optimized program, whose op_name metadata maps each HLO op to the model code,
    as `benchmarks.profile_train_step` reads it on CPU). Both sit at the top of `trace_dir` (the device tool brings
    back files at most two folders below $OUT). Prints the `top` kernels of the device lanes by time. Returns the
    new state (the step donates its input state)."""
    os.makedirs(trace_dir, exist_ok=True)
    with gzip.open(os.path.join(trace_dir, "step_hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    with tempfile.TemporaryDirectory() as raw:
        jax.profiler.start_trace(raw, create_perfetto_trace=True)
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()
        found = glob.glob(os.path.join(raw, "**", "*.trace.json.gz"), recursive=True)
        found = [f for f in found if not os.path.basename(f).startswith("perfetto")] or found
        if not found:
            raise RuntimeError(f"jax.profiler wrote no trace under {raw}")
        path = os.path.join(trace_dir, "step.trace.json.gz")
        shutil.copyfile(found[0], path)
    with gzip.open(path) as f:
        by_name, lanes = device_kernel_ms(json.load(f)["traceEvents"])
    print(f"trace of one step: {path} ({os.path.getsize(path) / 2**20:.1f} MiB), program: step_hlo.txt.gz")
    if not by_name:
        print("trace: no accelerator lanes (/device:...) in this trace: the host ran the step")
        return state
    total = sum(by_name.values())
    print(f"trace: {len(by_name)} kernels on {lanes} device lanes, {total:.1f} ms summed; top {top}:")
    for name, ms in by_name.most_common(top):
        print(f"  {ms:9.2f} ms {100 * ms / total:5.1f} %  {name[:110]}")
    return state


def add_model_arguments(p: argparse.ArgumentParser, layer_pairs: bool = False) -> None:
    """The model-shape arguments shared by the 8B benchmarks (this one, `latency_8b`, `memory_8b`).

    layer_pairs: `--layers N1 N2` (memory_8b: compile at two depths and extrapolate) instead of `--layers N`.
    """
    p.add_argument("--backbone_config", default="configs/hf/qwen3_vl_8b_instruct")
    p.add_argument("--decoder_config", default="configs/hf/qwen3_1p7b")
    p.add_argument("--k", type=int, default=4, help="K_max, the latent steps")
    if layer_pairs:
        p.add_argument("--layers", type=int, nargs=2, metavar=("N1", "N2"),
                       help="compile truncated models at N1, N2 layers and extrapolate to the full depth")
    else:
        p.add_argument("--layers", type=int, default=0, help="truncate both LMs to this many layers (0 = all)")
    p.add_argument("--attention", default="xla", help="attention_impl of both LMs and the vision tower")
    p.add_argument("--quick", action="store_true",
                   help="the phantom VLM's towers at one layer and small inputs: the CI smoke test of the script")


def paper_model(args: argparse.Namespace, remat: bool, scan_layers: bool, remat_policy: str = "full",
                layers: tuple[int, int] | None = None) -> VitalModel:
    """VITAL at the paper's shapes: Qwen3-VL-8B (bf16 weights) + LoRA r64 on every projection, the Qwen3-1.7B
    auxiliary decoder (float32 master weights, bf16 compute), K_max = args.k.

    layers: (backbone text layers, decoder layers) to truncate the two LMs to; None: `args.layers` for both, when
    set (the vision tower keeps its depth either way).
    """
    check_backend(args.attention)   # "cudnn" needs an NVIDIA GPU, "pallas_flash" a TPU: say so before compiling
    backbone_overrides = dict(dtype="bfloat16", param_dtype="bfloat16", remat=remat, scan_layers=scan_layers,
                              attention_impl=args.attention, remat_policy=remat_policy)
    decoder_overrides = dict(backbone_overrides, param_dtype="float32")
    if args.quick:  # the CI smoke test of the script's plumbing: the shipped phantom VLM's towers, one layer each
        # Read from their config.json files as the 8B's are (transformers' config classes would import torch, seconds
        # for nothing else). The vocabularies hold the synthetic prompts' ids (< 1000), the image tokens lie above.
        pair = assets.phantom_vlm()
        backbone = Qwen3VLConfig.from_pretrained(pair["backbone_dir"], **backbone_overrides)
        backbone = dataclasses.replace(
            backbone, text=dataclasses.replace(backbone.text, vocab_size=4096, num_hidden_layers=1),
            vision=dataclasses.replace(backbone.vision, depth=1, deepstack_visual_indexes=(0,)),
            image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)
        decoder = dataclasses.replace(Qwen3Config.from_pretrained(pair["decoder_dir"], **decoder_overrides),
                                      vocab_size=4096, num_hidden_layers=1)
    else:
        backbone = Qwen3VLConfig.from_pretrained(args.backbone_config, **backbone_overrides)
        decoder = Qwen3Config.from_pretrained(args.decoder_config, **decoder_overrides)
    if layers is None and args.layers:
        layers = (args.layers, args.layers)
    if layers is not None:
        backbone = dataclasses.replace(backbone, text=dataclasses.replace(backbone.text,
                                                                          num_hidden_layers=layers[0]))
        decoder = dataclasses.replace(decoder, num_hidden_layers=layers[1])
    return VitalModel(VitalConfig(k_max=args.k, roi_dim=1152, remat_latent_steps=remat,
                                  lora=LoraConfig(64, 128.0, 0.05)), backbone, decoder)


def main(argv=None):
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--grid", type=int, default=28, help="patch grid side (28 = a 448x448 image)")
    p.add_argument("--answer_len", type=int, default=32)
    p.add_argument("--step_len", type=int, default=48)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no_remat", action="store_true")
    p.add_argument("--remat_policy", default="full",
                   help="what remat keeps: full, dots or projections (Qwen3Config.remat_policy)")
    p.add_argument("--loop_layers", action="store_true",
                   help="unrolled decoder layers (compiles every layer; the default scans one compiled layer)")
    p.add_argument("--trace_dir", default="",
                   help="after the timed steps, trace one more into this folder (`trace_one_step`)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.grid, args.answer_len, args.step_len, args.steps = 1, 32, 4, 4, 4, 1

    remat = not args.no_remat
    model = paper_model(args, remat=remat, scan_layers=not args.loop_layers, remat_policy=args.remat_policy)
    backbone = model.backbone_config
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()}; jax {jax.__version__}; remat {remat} "
          f"({args.remat_policy}); "
          f"attention {args.attention}")
    t0 = time.perf_counter()
    params = random_params(model.abstract_params())
    jax.block_until_ready(params)
    print(f"random params on device in {time.perf_counter() - t0:.1f}s")
    optimizer = trainable.make_optimizer(2e-5)
    state, frozen = init_train_state(params, optimizer, jax.random.PRNGKey(1))
    del params
    batch = from_numpy(synthetic_batch(backbone, args.batch, args.prompt_len, args.grid, args.answer_len, args.k,
                                       args.step_len, 1152), backbone)
    step = jax.jit(functools.partial(train_step, model, optimizer), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    print(f"compiled in {time.perf_counter() - t0:.1f}s")
    # Executed matmul FLOPs (remat included) from the optimized HLO's dots. Not `cost_analysis()`: it counts a scan
    # body once. On GPUs XLA turns the dots into cuBLAS custom calls, which this counter does not read (0 found):
    # memory_8b's CPU compile of the same program gives the ratio there.
    xla_flops = xla_flops_lib.matmul_flops(compiled.as_text()) or None
    try:
        mem = compiled.memory_analysis()
        print(f"memory: args {mem.argument_size_in_bytes / 2**30:.1f} GiB, temps {mem.temp_size_in_bytes / 2**30:.1f}"
              f" GiB, outputs {mem.output_size_in_bytes / 2**30:.1f} GiB")
    except Exception as e:  # noqa: BLE001
        print(f"memory_analysis unavailable: {e}")
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    if args.trace_dir:
        # A diagnostic on top of the measurement: if the profiler cannot run here (no CUPTI, say), say so and still
        # print the step's numbers.
        try:
            state = trace_one_step(compiled, state, frozen, batch, args.trace_dir)
        except Exception as e:  # noqa: BLE001
            print(f"trace: failed ({type(e).__name__}: {e}); the step's numbers below do not depend on it")
    flops = accounting.train_step_flops(model, accounting.account(model), args.batch, args.prompt_len,
                                        args.batch * args.grid * args.grid, args.answer_len, args.step_len)
    peak = peak_flops_per_device(device.device_kind)
    print(f"loss {float(metrics['loss']):.3f}; step {step_s * 1e3:.1f} ms (median of {args.steps}); "
          f"{args.batch / step_s:.2f} samples/s")
    print(f"model FLOPs/step {flops / 1e12:.2f} T -> {flops / step_s / 1e12:.1f} TFLOP/s"
          + (f", MFU {100 * flops / step_s / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""))
    if xla_flops:
        print(f"executed matmul FLOPs/step {xla_flops / 1e12:.2f} T ({xla_flops / flops:.2f}x model, remat included)"
              f" -> {xla_flops / step_s / 1e12:.1f} TFLOP/s" + (f", {100 * xla_flops / step_s / peak:.1f}% of peak"
                                                             if peak else ""))
    else:
        print("executed matmul FLOPs: no dots in the optimized program (GPU: cuBLAS custom calls); "
              "python -m benchmarks.memory_8b counts the same step compiled for CPU")


if __name__ == "__main__":
    main()
