"""How fast could `peer_inference`'s program run on this machine? Its phases timed one by one, against a floor
built from this CPU's own limits measured in the same process (issue #16: is the 2x goal within reach here?).

    python -m benchmarks.inference_floor [--repeats 5 --vision_query_chunk Q --quick] (+ peer_inference's sizes)

Phases, each its own jitted program on the same random checkpoint and prompt as `benchmarks.peer_inference`:
vision tower alone; prefix (vision tower + prefill into the cache); K latent steps; greedy decoding of the answer;
and the whole `latent.generate_answer` program. Limits of the machine, measured here:

- matmul rate: the best of a (M, 2048) x (2048, 2048) float32 product (M = the prompt's length) and a square
  2048^3 one, in GFLOP/s: a floor for the compute-bound phases (vision tower, prefill), whose FLOPs are XLA's
  own count of the compiled program's dots (`benchmarks.xla_flops`);
- weight streaming: a (1, 4096) x (4096, 16384) float32 matrix-vector product (256 MiB read once), in GB/s: a
  floor for the sequential phases, each of whose steps must read every text-layer weight (and, for an answer
  token, the LM head) plus the keys and values written so far.

The floor of the whole program is the sum of the phases' floors; `transformers / floor` is the most any
implementation could gain over transformers on this machine at these sizes. The last line prints it. `--quick`
(the CI smoke test) measures the limits on small matrices, once each: its rates and floors mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import xla_flops
from benchmarks.latent_overhead import best_ms
from benchmarks.machine import apply_host_setting, quick_sizes
from benchmarks.peer_inference import QUICK, add_size_arguments, torch_generate
from benchmarks.qwen3_vl_latency import build_models_and_prompt
from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3_vl import cached
from vital_jax.vital import latent
from vital_jax.vital.batch import prefix_inputs


# --quick measures the machine's limits on small matrices: a smoke run's rates mean nothing, and drawing the 256 MiB
# matrix alone takes seconds.
QUICK_MATMUL_SIDE, QUICK_STREAM_SHAPE = 256, (256, 1024)


def matmul_gflops(m: int, repeats: int, side: int = 2048) -> float:
    """Best rate of XLA's float32 matmul on this machine, GFLOP/s: the better of (m, side) x (side, side) and a
    square side^3 product."""
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal((side, side)), jnp.float32)
    dot = jax.jit(jnp.dot)
    rates = []
    for rows in (m, side):
        a = jnp.asarray(rng.standard_normal((rows, side)), jnp.float32)
        jax.block_until_ready(dot(a, b))
        ms = best_ms({"dot": lambda a=a: dot(a, b)}, repeats)["dot"]
        rates.append(2 * rows * side * side / (ms * 1e-3) / 1e9)
    return max(rates)


def weight_stream_gbs(repeats: int, shape: tuple[int, int] = (4096, 16384)) -> float:
    """GB/s of a float32 matrix-vector product over a `shape` matrix (by default 256 MiB): how fast decoding can
    read weights."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, shape[0])), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(x, w))
    ms = best_ms({"matvec": lambda: dot(x, w)}, repeats)["matvec"]
    return w.nbytes / (ms * 1e-3) / 1e9


def nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def main(argv=None):
    parser = argparse.ArgumentParser()
    add_size_arguments(parser)
    parser.add_argument("--latent_steps", type=int, default=4)
    args = parser.parse_args(argv)
    args = quick_sizes(args, QUICK)
    k = args.latent_steps
    print(apply_host_setting(), file=sys.stderr)

    hf_model, config, params, backbone, patches, grid, ids = build_models_and_prompt(args)
    ids = ids.astype(np.int32)
    prefix = prefix_inputs(ids, np.ones(ids.shape, bool), np.asarray([grid]), patches, config)
    sampling = SamplingConfig(max_new_tokens=args.answer)
    cache_len = ids.shape[1] + k + args.answer
    kk = jnp.full((1,), k, jnp.int32)

    vision = jax.jit(lambda p, x, vi: backbone.apply({"params": p}, x, vi, method=backbone.encode_images))
    # The cache in generation's layout (one stacked array, `generate_answer`): a per-layer cache would time the
    # latent steps with copies of every layer's slots that the whole program does not make.
    encode = jax.jit(lambda p, pre: latent.encode_prefix(backbone, p, pre, cache_len, per_layer_cache=False))
    steps = jax.jit(lambda p, cache, z0: latent.latent_loop(backbone, p, cache, z0, kk, k))
    decode = jax.jit(lambda p, cache, z: cached.decode(backbone, p, cache, z, sampling)[0])
    whole = jax.jit(lambda p, pre: latent.generate_answer(backbone, p, pre, kk, k, sampling)[0])

    cache0, z0 = jax.block_until_ready(encode(params, prefix))
    _, z_last, cache_k = jax.block_until_ready(steps(params, cache0, z0))
    jax.block_until_ready(decode(params, cache_k, z_last))
    ours = list(np.asarray(jax.block_until_ready(whole(params, prefix)))[0])
    theirs = torch_generate(hf_model, ids, patches, grid, k, args.answer)
    if ours[:2] != theirs[:2]:
        raise SystemExit(f"vital_jax answered {ours} but transformers {theirs}: not the same computation")
    timed = best_ms({
        "vision tower": lambda: vision(params, prefix.pixel_patches, prefix.vision_inputs),
        "prefix (vision + prefill)": lambda: encode(params, prefix),
        f"{k} latent steps": lambda: steps(params, cache0, z0),
        f"{args.answer} answer tokens": lambda: decode(params, cache_k, z_last),
        "whole program": lambda: whole(params, prefix),
        "transformers (whole)": lambda: torch_generate(hf_model, ids, patches, grid, k, args.answer),
    }, args.repeats)

    if args.quick:
        gflops = matmul_gflops(ids.shape[1], args.repeats, QUICK_MATMUL_SIDE)
        gbs = weight_stream_gbs(args.repeats, QUICK_STREAM_SHAPE)
    else:
        gflops, gbs = matmul_gflops(ids.shape[1], args.repeats), weight_stream_gbs(args.repeats)
    flops = {name: xla_flops.matmul_flops(fn.lower(*a).compile().as_text()) for name, fn, a in (
        ("vision tower", vision, (params, prefix.pixel_patches, prefix.vision_inputs)),
        ("prefix (vision + prefill)", encode, (params, prefix)))}
    # Everything of the text decoder but its embedding table (one row read per token); the LM head (or, tied, the
    # embedding table, all of which the head reads).
    layer_bytes = nbytes(params["language_model"]) - nbytes(params["language_model"]["embed_tokens"])
    head_bytes = nbytes(params["lm_head"] if "lm_head" in params else params["language_model"]["embed_tokens"])
    kv_bytes_per_slot = (nbytes(cache0.k) + nbytes(cache0.v)) // cache_len  # keys and values, all layers, one slot
    # Step s of the sequential part reads every layer's weights and the cache up to its slot; an answer token
    # also reads the LM head (the first one only that: it comes from the last latent state).
    prompt_len = ids.shape[1]
    latent_bytes = sum(layer_bytes + (prompt_len + s) * kv_bytes_per_slot for s in range(k))
    answer_bytes = head_bytes + sum(layer_bytes + head_bytes + (prompt_len + k + t) * kv_bytes_per_slot
                                    for t in range(args.answer - 1))
    floors = {"vision tower": flops["vision tower"] / gflops / 1e6,
              "prefix (vision + prefill)": flops["prefix (vision + prefill)"] / gflops / 1e6,
              f"{k} latent steps": latent_bytes / gbs / 1e6,
              f"{args.answer} answer tokens": answer_bytes / gbs / 1e6}
    floors["whole program"] = sum(v for n, v in floors.items() if n != "vision tower")

    print(f"config: text {args.hidden} x {args.layers} layers, vision {args.vision_hidden} x {args.vision_depth}, "
          f"{args.image}x{args.image} image, prompt {prompt_len} tokens, K = {k}, answer {args.answer} tokens, "
          f"float32, torch threads {torch.get_num_threads()}, jax {jax.devices()[0].platform}")
    print(f"this machine: matmul {gflops:.0f} GFLOP/s, weight streaming {gbs:.1f} GB/s; text layers "
          f"{layer_bytes / 2**20:.0f} MiB, LM head {head_bytes / 2**20:.0f} MiB")
    print(f"{'phase':28s} {'vital_jax ms':>12s} {'floor ms':>9s} {'floor from':>34s}")
    for name, floor in floors.items():
        basis = (f"{flops[name] / 1e9:.2f} GFLOP of dots" if name in flops else
                 "sum of the three phases below it" if name == "whole program" else
                 f"{(latent_bytes if 'latent' in name else answer_bytes) / 1e6:.0f} MB read")
        print(f"{name:28s} {timed[name]:12.1f} {floor:9.1f} {basis:>34s}")
    torch_ms = timed["transformers (whole)"]
    print(f"transformers (whole program) {torch_ms:.1f} ms: ratio today {torch_ms / timed['whole program']:.2f}x")
    print(f"most any implementation could reach here (transformers / floor): {torch_ms / floors['whole program']:.2f}x")


if __name__ == "__main__":
    main()
