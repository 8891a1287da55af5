"""VITAL inference against its PyTorch peer, same process, same random checkpoint: prefix (one image) -> K latent
steps -> a fixed-length greedy answer, vital_jax's jitted `latent.generate_answer` against transformers with a
DynamicCache stepping the same loop (issue #16: goal >= 2x at K = 4, latent overhead K = 4 / K = 0 <= 1.10).

    python -m benchmarks.peer_inference [--hidden 512 --layers 8 --vision_hidden 256 --vision_depth 4
                                         --image 448 --text 32 --answer 16 --repeats 5 --torch_threads N
                                         --vision_query_chunk Q --quick]

The model is a random Qwen3-VL built with transformers (`benchmarks.qwen3_vl_latency._build`: SDPA attention,
its fastest CPU path), saved and read back by `vital_jax.models.qwen3_vl.load_params`. The transformers side is the
loop a PyTorch reimplementation writes (and `tests/vital/test_latent.py` checks ours against): prefill with
`pixel_values`, then each latent step feeds the last hidden state back as `inputs_embeds` at MRoPE position
T + k + rope_delta on all three axes, then greedy tokens one at a time over the cache. No EOS, so both decode
exactly `--answer` tokens; the first answer tokens of both sides are compared (same weights, float32) so the
timed programs are known to compute the same thing. Timings are the best of `--repeats` interleaved runs
(compilation excluded, printed separately). The last line is the ratio at K = 4.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.latent_overhead import best_ms
from benchmarks.machine import apply_host_setting, cpu_description, quick_sizes
from benchmarks.qwen3_vl_latency import IMAGE, build_models_and_prompt
from vital_jax.generation import SamplingConfig
from vital_jax.vital import latent
from vital_jax.vital.batch import prefix_inputs

QUICK = dict(hidden=64, layers=1, vision_hidden=64, vision_depth=2, image=128, text=8, answer=4, repeats=1,
             vocab=600)


@torch.no_grad()
def torch_generate(hf_model, ids: np.ndarray, patches: np.ndarray, grid: tuple, k: int, answer: int) -> list[int]:
    """The PyTorch peer: prefill, K latent steps (hidden state fed back), `answer` greedy tokens. Batch 1."""
    vlm = hf_model.model  # no LM head where only hidden states are needed (prefill, latent steps)
    vlm.rope_deltas = None
    length = ids.shape[1]
    out = vlm(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(patches),
              image_grid_thw=torch.tensor([grid]), mm_token_type_ids=torch.from_numpy(ids == IMAGE).long(),
              use_cache=True)
    delta = int(vlm.rope_deltas[0])
    past, z = out.cache, out.last_hidden_state[:, -1:]
    for step in range(k):
        out = vlm(inputs_embeds=z, cache=past, position_ids=torch.full((3, 1, 1), length + step + delta),
                  use_cache=True)
        past, z = out.cache, out.last_hidden_state[:, -1:]
    # The answer's first token comes from the last latent state (VITAL's decoding), as in `cached.decode`.
    token = hf_model.lm_head(z)[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    for t in range(answer - 1):
        out = hf_model(input_ids=token, cache=past, use_cache=True,
                       position_ids=torch.full((3, 1, 1), length + k + t + delta), logits_to_keep=1)
        past = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, prompt and timing arguments shared with `benchmarks.inference_floor` (issue #16's sizes)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision_hidden", type=int, default=256)
    parser.add_argument("--vision_depth", type=int, default=4)
    parser.add_argument("--image", type=int, default=448, help="side of the square random image, pixels")
    parser.add_argument("--text", type=int, default=32, help="text tokens around the image")
    parser.add_argument("--answer", type=int, default=16, help="greedy answer tokens (no EOS)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vision_query_chunk", type=int, default=0,
                        help="vital_jax's Qwen3VLVisionConfig.attention_query_chunk (0 = the default, one block)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed run, for the CI smoke test")


def main(argv=None):
    parser = argparse.ArgumentParser()
    add_size_arguments(parser)
    parser.add_argument("--torch_threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    args = quick_sizes(args, QUICK)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    host = apply_host_setting()

    hf_model, config, params, backbone, patches, grid, ids = build_models_and_prompt(args)
    ids = ids.astype(np.int32)
    prefix = prefix_inputs(ids, np.ones(ids.shape, bool), np.asarray([grid]), patches, config)
    sampling = SamplingConfig(max_new_tokens=args.answer)
    infer = jax.jit(lambda bp, pre, kk, slots: latent.generate_answer(backbone, bp, pre, kk, slots, sampling)[0],
                    static_argnums=(3,))

    fns, compile_s = {}, {}
    for k in (0, 4):
        kk = jnp.full((1,), k, jnp.int32)
        start = time.perf_counter()
        ours = np.asarray(jax.block_until_ready(infer(params, prefix, kk, k)))[0]
        compile_s[k] = time.perf_counter() - start
        theirs = torch_generate(hf_model, ids, patches, grid, k, args.answer)
        # Greedy argmax over random logits: float32 rounding may flip a near-tie late in the answer, but the first
        # tokens must agree, or the two sides are not timing the same computation.
        if list(ours[:2]) != theirs[:2]:
            raise SystemExit(f"K={k}: vital_jax answered {list(ours)} but transformers {theirs}")
        fns[("vital_jax", k)] = lambda kk=kk, k=k: jax.block_until_ready(infer(params, prefix, kk, k))
        fns[("transformers", k)] = lambda k=k: torch_generate(hf_model, ids, patches, grid, k, args.answer)
    best = best_ms(fns, args.repeats)

    print(f"config: text {args.hidden} x {args.layers} layers, vision {args.vision_hidden} x {args.vision_depth}, "
          f"{args.image}x{args.image} image ({patches.shape[0] // config.merge_unit} tokens), prompt {ids.shape[1]} "
          f"tokens, answer {args.answer} tokens, float32, vision query blocks {args.vision_query_chunk or 'off'}, "
          f"torch threads {torch.get_num_threads()}, "
          f"jax {jax.devices()[0].platform}; {cpu_description()}; {host}")
    for k in (0, 4):
        jms, tms = best[("vital_jax", k)], best[("transformers", k)]
        print(f"K={k}: vital_jax {jms:8.1f} ms (compile {compile_s[k]:.1f} s)   transformers {tms:8.1f} ms   "
              f"ratio {tms / jms:.2f}x")
    print(f"latent overhead K=4 / K=0: vital_jax {best[('vital_jax', 4)] / best[('vital_jax', 0)]:.3f}, "
          f"transformers {best[('transformers', 4)] / best[('transformers', 0)]:.3f}")
    print(f"ratio at K=4 (transformers / vital_jax): {best[('transformers', 4)] / best[('vital_jax', 4)]:.2f}x")


if __name__ == "__main__":
    main()
