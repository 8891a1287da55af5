"""Inference latency of VITAL at the paper's 8B shapes, K = 0 (a plain LoRA-tuned VLM) against K = k (4), on
whatever accelerator JAX sees; the paper's Fig. 4 reports 325 ms (K = 0) and 353 ms (K = 4) for Qwen3-VL-8B
(its answers' lengths, hardware and serving stack unstated).

    python -m benchmarks.latency_8b [--prompt_len 256 --grid 28 --answer 16 --repeats 10] [--attention dot_product]
        [--layers N]   # truncate the LM to N layers
        [--quick]      # the phantom VLM's towers at one layer, a short prompt: the CI smoke test of the script

One jitted `latent.generate_answer` per K (K is the static slot count of the latent scan), batch 1, bf16 weights,
LoRA r64 unmerged on every projection (the deployed model: backbone + adapters, no scaffolding), random weights,
one 448x448 image (196 image tokens) in a `prompt_len`-token prompt, a greedy answer of exactly `answer` tokens
(no EOS). Besides the whole program at K = 0 and K = k it times the prefix alone (vision tower + prefill into the
cache) and derives one latent step (the two programs differ by k latent steps) and one answer token (the K = 0
program minus the same program answering 1 token, over answer - 1 decode steps). Best of `repeats`, the
programs interleaved round by round.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.latent_overhead import best_ms
from benchmarks.mfu_8b import add_model_arguments, paper_model, random_params, synthetic_batch
from vital_jax.generation import SamplingConfig
from vital_jax.vital import latent
from vital_jax.vital.batch import prefix_inputs


def main(argv=None):
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--grid", type=int, default=28, help="patch grid side (28 = a 448x448 image)")
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--scan_layers", action="store_true",
                   help="decode with the layers as one scan over stacked weights, as trained (slower: each token "
                        "copies every layer's weights); the default is the layout `inference.Predictor` decodes in")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_len, args.grid, args.answer, args.repeats = 32, 4, 3, 1

    # Unrolled layers unless asked otherwise: the layout evaluation decodes in (`qwen3_vl_params.decoding_layout`,
    # which with these bf16 weights keeps the adapters, so unrolling is all it changes).
    model = paper_model(args, remat=False, scan_layers=args.scan_layers)
    config, backbone = model.backbone_config, model.backbone
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; jax {jax.__version__}; attention {args.attention}; "
          f"text layers {'scanned' if args.scan_layers else 'unrolled'}")
    start = time.perf_counter()
    params = random_params(model.abstract_params()["backbone"])
    jax.block_until_ready(params)
    print(f"random backbone params on device in {time.perf_counter() - start:.1f}s")
    row = synthetic_batch(config, 1, args.prompt_len, args.grid, 1, 1, 1, 8)
    prefix = jax.device_put(prefix_inputs(row["prompt_ids"], row["prompt_valid"], row["image_grid_thw"],
                                          row["pixel_patches"], config))

    def program(k: int, answer: int):
        sampling = SamplingConfig(max_new_tokens=answer)
        steps = jnp.full((1,), k, jnp.int32)
        # --scan_layers decodes in the scan, as held (relayout=False): what it measures.
        fn = jax.jit(lambda bp, pre: latent.generate_answer(backbone, bp, pre, steps, k, sampling,
                                                            relayout=False if args.scan_layers else None)[0])
        start = time.perf_counter()
        jax.block_until_ready(fn(params, prefix))
        return (lambda: fn(params, prefix)), time.perf_counter() - start

    # The parameters are arguments, never closed over: a closure would embed 17 GB of constants in the program.
    # The cache is returned too: returning only z0 would let XLA drop the cache writes.
    # In generation's cache layout (stacked, as `generate_answer` prefills).
    prefix_program = jax.jit(lambda bp, pre: latent.encode_prefix(backbone, bp, pre,
                                                                  args.prompt_len + args.k + args.answer,
                                                                  per_layer_cache=False))

    fns, compile_s = {}, {}
    ks = sorted({0, args.k})
    for k in ks:
        fns[f"K={k}"], compile_s[k] = program(k, args.answer)
    fns["K=0, 1 token"], _ = program(0, 1)
    jax.block_until_ready(prefix_program(params, prefix))
    fns["prefix"] = lambda: prefix_program(params, prefix)
    best = best_ms(fns, args.repeats)

    print(f"config: {args.backbone_config} (text layers {config.text.num_hidden_layers}), LoRA r64, bf16, "
          f"prompt {args.prompt_len} tokens incl. {args.grid ** 2 // 4} image tokens, answer {args.answer} tokens, "
          f"batch 1, best of {args.repeats}")
    print(f"prefix (vision tower + prefill): {best['prefix']:.1f} ms")
    decode_ms = (best["K=0"] - best["K=0, 1 token"]) / (args.answer - 1) if args.answer > 1 else float("nan")
    latent_ms = (best[f"K={args.k}"] - best["K=0"]) / args.k if args.k else float("nan")
    print(f"one answer token: {decode_ms:.2f} ms; one latent step: {latent_ms:.2f} ms")
    for k in ks:
        print(f"K={k}: {best[f'K={k}']:8.1f} ms  (compile {compile_s[k]:.1f} s)")
    print(f"latent overhead K={args.k} / K=0: {best[f'K={args.k}'] / best['K=0']:.3f} (paper, 8B: 353 / 325 = 1.086)")


if __name__ == "__main__":
    main()
