"""Qwen3-VL latency with one image: vital_jax (jitted) vs transformers PyTorch, same process, same weights.

    python -m benchmarks.qwen3_vl_latency [--hidden 256 --layers 4 --vision_hidden 128 --vision_depth 4
                                           --image 448 --text 32 --steps 16 --repeats 5 --torch_threads N
                                           --quick]

A small random Qwen3-VL is built with transformers, saved with `save_pretrained` and read back with
`vital_jax.models.qwen3_vl.load_params`. One random RGB image goes through `preprocessing.preprocess_image`
(448x448 -> a 28x28 patch grid, 196 image tokens). Timed in float32 on this machine's CPU:
  vision  - the vision tower alone (patches -> merged features + deepstack features)
  prefill - vision + text decoder over the whole prompt, filling the KV cache, with logits
  decode  - one cached decode step (one token), averaged over `--steps` steps
Prints milliseconds and the ratio torch / jax (> 1 means vital_jax is faster). JAX compilation is excluded from
the timings and printed separately. transformers runs with SDPA attention (its fastest CPU path). JAX and torch
runs alternate and the best of `--repeats` is kept, so both see the same background load. Exits non-zero when the
two prefills' logits differ by more than 1e-3 (not the same computation). `--quick`: tiny sizes, one timed run
(the CI smoke test; its times mean nothing).

On a shared CPU, torch's OpenMP threads slow down by up to 10x whenever another process holds a core (a
descheduled thread stalls every parallel region), which inflates the ratios; `--torch_threads 1` (optionally with
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") compares one thread each.
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.machine import quick_sizes
from benchmarks.qwen3_latency import prefill_logit_diff
from conversion.torch_decoding import cache_keyword
from tests.hf_reference import save_tiny_qwen3_vl
from vital_jax.models.qwen3_vl import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index, init_cache,
                                       load_params, vision_inputs)
from vital_jax.models.qwen3_vl.params import decoding_layout
from vital_jax.models.qwen3_vl.preprocessing import preprocess_image

IMAGE, VISION_START, VISION_END = 190, 188, 189  # token ids of save_tiny_qwen3_vl
FIRST_TEXT_ID = 200
QUICK = dict(hidden=64, layers=1, vocab=1024, vision_hidden=64, vision_depth=2, image=128, text=8, steps=2,
             repeats=1)


def _race(jax_fn, torch_fn, repeats):
    """Best of `repeats` ms for each, alternating the two so both see the same background load.

    Each fn returns its own elapsed ms. Best of N (as timeit recommends): other processes only ever add time.
    """
    jax_ms, torch_ms = [], []
    for _ in range(repeats):
        jax_ms.append(jax_fn())
        torch_ms.append(torch_fn())
    return min(jax_ms), min(torch_ms)


def _ms(fn):
    def timed():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return timed


def _timed_s(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _build(path, args):
    head_dim = 64
    heads = max(1, args.hidden // head_dim)
    spatial = head_dim // 2 * 20 // 64  # mrope_section in the 8B's proportions: (24, 20, 20) of 64 frequencies
    section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=max(1, args.vision_hidden // 32),
                  intermediate_size=3 * args.vision_hidden, out_hidden_size=args.hidden,
                  num_position_embeddings=2304, deepstack_visual_indexes=list(range(args.vision_depth - 1))[-3:])
    hf_model = save_tiny_qwen3_vl(path, text=text, vision=vision).to(torch.float32).eval()
    hf_model.set_attn_implementation("sdpa")
    return hf_model


def _prompt(rng, image_tokens, text_tokens, vocab):
    half = text_tokens // 2
    return np.concatenate([rng.randint(FIRST_TEXT_ID, vocab, half), [VISION_START], np.full(image_tokens, IMAGE),
                           [VISION_END], rng.randint(FIRST_TEXT_ID, vocab, text_tokens - half)])[None]


def build_models_and_prompt(args):
    """The random checkpoint at `args`' sizes, in transformers and in vital_jax, and one prompt around one random
    `args.image`-pixel image: (hf_model, config, params, Flax model, pixel patches, grid (t, h, w), ids (1, L)).
    vital_jax's side is in the layout evaluation decodes in (`qwen3_vl_params.decoding_layout`: fused projections)."""
    path = tempfile.mkdtemp()
    hf_model = _build(path, args)
    config = Qwen3VLConfig.from_pretrained(path, attention_query_chunk=getattr(args, "vision_query_chunk", 0))
    config, params, _ = decoding_layout(config, load_params(path, config))
    params = jax.device_put(params)
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (args.image, args.image, 3), dtype=np.uint8)
    patches, grid = preprocess_image(image)
    ids = _prompt(rng, patches.shape[0] // config.merge_unit, args.text, args.vocab)
    return (hf_model, config, params, Qwen3VLForConditionalGeneration(config), patches,
            tuple(int(g) for g in grid), ids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision_hidden", type=int, default=128)
    parser.add_argument("--vision_depth", type=int, default=4)
    parser.add_argument("--image", type=int, default=448, help="side of the square random image, pixels")
    parser.add_argument("--text", type=int, default=32, help="text tokens around the image")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch_threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed run, for the CI smoke test")
    args = parser.parse_args()
    args = quick_sizes(args, QUICK)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    hf_model, config, params, model, patches, grid, ids = build_models_and_prompt(args)
    grids = [grid]
    positions, delta = get_rope_index(ids, None, grids, IMAGE)
    max_len = ids.shape[1] + args.steps + 1
    vis = vision_inputs(grids, config.vision)
    jids, jpos, jpatches = jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(patches)

    @jax.jit
    def encode(p, patches, vis):
        return model.apply({"params": p}, patches, vis, method=model.encode_images)

    @jax.jit
    def prefill(p, ids, positions, patches, vis):
        return model.apply({"params": p}, input_ids=ids, positions=positions, pixel_patches=patches,
                           vision_inputs=vis, kv_cache=init_cache(config, 1, max_len))

    @jax.jit
    def step(p, tok, cache):
        out = model.apply({"params": p}, input_ids=tok, kv_cache=cache)
        return out.logits, out.kv_cache

    compile_vision = _timed_s(lambda: jax.block_until_ready(encode(params, jpatches, vis)))
    out = None

    def run_prefill():
        nonlocal out
        out = jax.block_until_ready(prefill(params, jids, jpos, jpatches, vis))

    compile_prefill = _timed_s(run_prefill)
    tok = jnp.full((1, 1), FIRST_TEXT_ID, jnp.int32)
    compile_step = _timed_s(lambda: jax.block_until_ready(step(params, tok, out.kv_cache)))

    def jax_decode():
        cache = out.kv_cache
        for _ in range(args.steps):
            logits, cache = step(params, tok, cache)
        jax.block_until_ready(logits)

    torch.set_grad_enabled(False)
    tids, tpatches, tgrid = torch.tensor(ids), torch.tensor(patches), torch.tensor(grids)
    mm_types = torch.tensor((ids == IMAGE).astype(np.int64))
    ttok = torch.full((1, 1), FIRST_TEXT_ID)

    def torch_prefill():
        hf_model.model.rope_deltas = None
        return hf_model(input_ids=tids, pixel_values=tpatches, image_grid_thw=tgrid, mm_token_type_ids=mm_types,
                        use_cache=True)

    keyword = cache_keyword(hf_model)

    def torch_decode():
        past = getattr(torch_prefill(), keyword)
        start = time.perf_counter()
        for t in range(args.steps):
            # Explicit (3, B, 1) positions: HF would otherwise drop the rope delta of the image prompt.
            pos = torch.full((3, 1, 1), ids.shape[1] + t + int(delta[0]))
            past = getattr(hf_model(input_ids=ttok, position_ids=pos, use_cache=True, **{keyword: past}), keyword)
        return (time.perf_counter() - start) * 1e3

    # Same inputs, same weights: a benchmark of a wrong path would be meaningless.
    logit_diff = prefill_logit_diff(out.logits, torch_prefill().logits.numpy())
    rows = {
        "vision": _race(_ms(lambda: jax.block_until_ready(encode(params, jpatches, vis))),
                        _ms(lambda: hf_model.model.get_image_features(tpatches, tgrid)), args.repeats),
        "prefill": _race(_ms(run_prefill), _ms(torch_prefill), args.repeats),
        "decode step": tuple(ms / args.steps for ms in _race(_ms(jax_decode), torch_decode, args.repeats)),
    }

    print(f"config: text hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; vision hidden "
          f"{args.vision_hidden}, depth {args.vision_depth}; image {args.image}x{args.image} -> grid "
          f"{grids[0][1]}x{grids[0][2]} ({patches.shape[0]} patches, {patches.shape[0] // config.merge_unit} "
          f"image tokens); prompt {ids.shape[1]} tokens; batch 1, fp32, {jax.devices()[0].platform}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"jax compile: vision {compile_vision:.2f}s, prefill {compile_prefill:.2f}s, "
          f"decode step {compile_step:.2f}s; prefill logits max |jax - torch| {logit_diff:.1e}")
    for name, (ours, theirs) in rows.items():
        print(f"{name:<12} jax {ours:8.2f} ms   torch {theirs:8.2f} ms   ratio torch/jax {theirs / ours:5.2f}x")


if __name__ == "__main__":
    main()
