"""Stage II rollout throughput: MedSynapse-V's jitted GRPO rollout against a plain transformers `generate` loop on
the same random model, same prompts, G sampled completions per prompt, same number of new tokens; generated tokens
per second of each, measured in the same run.

    python -m benchmarks.grpo_throughput [--hidden 256 --layers 4 --prompts 4 --generations 4 --new_tokens 64]
    python -m benchmarks.grpo_throughput --quick        # tiny sizes, for CI
    python -m benchmarks.grpo_throughput --scan_layers --lora_rank 16 --compare_relayout
                                                        # the 8B recipe's layout: relaid out vs. decoded as held
    python -m benchmarks.grpo_throughput --prompt 1024 --compare_prompt_copies
                                                        # one prompt cache per prompt vs. a copy per completion

vital_jax: `grpo.rollout` under jit: M and M' from P_phi, each prompt prefilled once with its memory block, its
cache shared by the G completions (`GRPOConfig.shared_prompt_cache`; `--compare_prompt_copies` also times a copy
per completion and prints both programs' temporary memory as XLA plans it), then the on-device while_loop decode
(temperature 1, no top-k / top-p, no EOS, so every completion has exactly `--new_tokens` tokens). Compile excluded;
median of `--repeats` runs, each with a new key,
alternating run by run with transformers' (so that load from other processes hits both alike).

transformers: the same weights (the model directory is written from the Flax params as HF safetensors and read by
`Qwen3VLForConditionalGeneration.from_pretrained`), the B prompts batched, `generate(do_sample=True,
temperature=1, top_k=0, top_p=1, num_return_sequences=G, min_new_tokens = max_new_tokens)`: what a GRPO loop on
transformers does (TRL without vLLM). It prefills all B * G rows (the image and prompt G times; the rollout
prefills B and copies the cache, one of the things measured here) and has no memory block (the rollout also runs
P_phi on F and F ⊙ B̄ and writes N = 16 memory positions). torch on CPU, float32, `--threads` intra-op threads
(default: torch's own, all cores); on a shared machine torch's multi-threaded speed varies most, so compare
`--threads 1` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import quick_sizes
from benchmarks.medsynapse_latency import image_prompts, tiny_backbone
from vital_jax.layers.linear import LoraConfig
from vital_jax.medsynapse import grpo
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.cached import prefix_inputs

QUICK = dict(hidden=64, layers=1, prompt=24, grid=4, prompts=2, generations=2, new_tokens=8, repeats=1,
             feature_grid=4)


def jax_rollout(args, config, params, ids, patches, grids, relayout: bool = True, shared_prompt_cache: bool = True):
    """run(rng) -> Rollout for the jitted GRPO rollout, with `run.temp_bytes` (XLA's temporary buffers); `relayout`
    False decodes in the layout the policy is held in (`GRPOConfig.rollout_relayout`), for `--compare_relayout`;
    `shared_prompt_cache` False gives each completion its own copy of the prompt's cache, for
    `--compare_prompt_copies`."""
    if args.scan_layers:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, scan_layers=True))
        params = qwen3_vl_params.to_layout(params, True)
    lora = None
    if args.lora_rank:
        lora = LoraConfig(args.lora_rank, 2.0 * args.lora_rank, 0.0, targets=("q", "k", "v", "o"))
        params = grpo.add_lora(jax.random.PRNGKey(1), params, config, lora)
    backbone = Qwen3VLForConditionalGeneration(config, lora)
    d, b, g = config.text.hidden_size, args.prompts, args.generations
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=d, num_queries=args.memory,
                                                    num_heads=max(1, args.feature_dim // 32)))
    rng = np.random.RandomState(2)
    side = args.feature_grid
    feature_map = jnp.asarray(rng.randn(b, side, side, args.feature_dim), jnp.float32)
    region = np.zeros((b, 1, side, side), bool)
    region[:, :, : side // 2, : side // 2] = True
    batch = grpo.PromptBatch(prefix=prefix_inputs(ids, np.ones(ids.shape, bool), grids, patches, config),
                             feature_map=feature_map, region_masks=jnp.asarray(region),
                             region_confidence=jnp.ones((b, 1), jnp.float32),
                             region_valid=jnp.ones((b, 1), bool), example_valid=jnp.ones((b,), bool))
    all_params = {"sampler": jax.jit(sampler.init)(jax.random.PRNGKey(3), feature_map[:1])["params"],
                  "backbone": params}
    cfg = grpo.GRPOConfig(num_generations=g, max_new_tokens=args.new_tokens, temperature=1.0,
                          rollout_relayout=relayout, shared_prompt_cache=shared_prompt_cache)
    compiled = jax.jit(functools.partial(grpo.rollout, backbone, sampler, cfg)).lower(
        all_params, batch, jax.random.PRNGKey(0)).compile()

    def run(key):
        return compiled(all_params, batch, key)

    run.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    return run


def hf_generate(args, path, config, ids, patches, grids):
    """run() -> generated ids (B * G, Tp + T) with transformers' `generate` on the same prompts."""
    import torch
    import transformers
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = HFQwen3VL.from_pretrained(path, dtype=torch.float32).eval()
    ids_t = torch.tensor(ids.astype(np.int64))
    inputs = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                  mm_token_type_ids=(ids_t == config.image_token_id).long(),
                  pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor(grids.astype(np.int64)))
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, num_return_sequences=args.generations, pad_token_id=0)

    def run():
        with torch.no_grad():
            return model.generate(**inputs, **kwargs)

    return run


def interleaved_seconds(fns: dict, repeats: int) -> dict:
    """Wall time of each fn(i) for i < repeats, the functions alternating so that load from other processes on a
    shared machine hits them alike."""
    out = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - start)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens, image included")
    p.add_argument("--grid", type=int, default=16, help="image patches per side (16: 64 image tokens)")
    p.add_argument("--prompts", type=int, default=4, help="B, prompts per rollout batch")
    p.add_argument("--generations", type=int, default=4, help="G, completions per prompt (paper: 4)")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--memory", type=int, default=16, help="N, memory vectors")
    p.add_argument("--feature_grid", type=int, default=16, help="side of E_ana's feature map fed to P_phi")
    p.add_argument("--feature_dim", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: roll out with unmerged LoRA on q, k, v, o")
    p.add_argument("--scan_layers", action="store_true",
                   help="hold the policy with its text layers scanned, as the 8B recipe trains it")
    p.add_argument("--compare_relayout", action="store_true",
                   help="also time the rollout decoding in the layout the policy is held in (rollout_relayout=False)")
    p.add_argument("--compare_prompt_copies", action="store_true",
                   help="also time the rollout with a copy of the prompt cache per completion "
                        "(shared_prompt_cache=False)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a few seconds of measurement)")
    args = p.parse_args(argv)
    args = quick_sizes(args, QUICK)

    path, config, params = tiny_backbone(tempfile.mkdtemp(), args.hidden, args.layers, args.grid)
    ids, patches, grids = image_prompts(config, args.prompts, args.prompt, args.grid)
    tokens = args.prompts * args.generations * args.new_tokens

    start = time.perf_counter()
    rollout = jax_rollout(args, config, params, ids, patches, grids)
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(rollout(jax.random.PRNGKey(100)))  # warm-up
    if int(out.lengths.sum()) != tokens:
        raise RuntimeError(f"the rollout generated {int(out.lengths.sum())} tokens, expected {tokens}")
    generate = hf_generate(args, path, config, ids, patches, grids)
    out = generate()  # warm-up
    if tuple(out.shape) != (args.prompts * args.generations, args.prompt + args.new_tokens):
        raise RuntimeError(f"transformers generated {tuple(out.shape)}")
    fns = {"jax": lambda i: jax.block_until_ready(rollout(jax.random.PRNGKey(i))), "hf": lambda i: generate()}
    if args.compare_relayout:
        as_held = jax_rollout(args, config, params, ids, patches, grids, relayout=False)
        jax.block_until_ready(as_held(jax.random.PRNGKey(100)))  # warm-up
        fns["as_held"] = lambda i: jax.block_until_ready(as_held(jax.random.PRNGKey(i)))
    if args.compare_prompt_copies:
        copies = jax_rollout(args, config, params, ids, patches, grids, shared_prompt_cache=False)
        jax.block_until_ready(copies(jax.random.PRNGKey(100)))  # warm-up
        fns["copies"] = lambda i: jax.block_until_ready(copies(jax.random.PRNGKey(i)))
    seconds = interleaved_seconds(fns, args.repeats)
    jax_s, hf_s = seconds["jax"], seconds["hf"]

    import torch

    jax_tps, hf_tps = tokens / float(np.median(jax_s)), tokens / float(np.median(hf_s))
    print(f"config: text hidden {config.text.hidden_size}, {args.layers} layers, {args.prompts} prompts x "
          f"{args.generations} completions x {args.new_tokens} new tokens (= {tokens} tokens per rollout), prompt "
          f"{args.prompt} tokens ({args.grid * args.grid // 4} image), N = {args.memory} memory vectors, "
          f"LoRA rank {args.lora_rank or 'none'}, text layers {'scanned' if args.scan_layers else 'unrolled'}, "
          f"sampling at temperature 1, fp32, "
          f"{jax.devices()[0].platform}; torch {torch.get_num_threads()} threads")
    print(f"vital_jax grpo.rollout (jit, compile {compile_s:.1f}s excluded): median {np.median(jax_s) * 1e3:8.1f} ms "
          f"per rollout -> {jax_tps:9.1f} tokens/s")
    if args.compare_relayout:
        held_s = float(np.median(seconds["as_held"]))
        print(f"vital_jax, decoded in the layout held (no relayout): median {held_s * 1e3:8.1f} ms per rollout -> "
              f"{tokens / held_s:9.1f} tokens/s ({held_s / float(np.median(jax_s)):.2f}x the relaid-out time)")
    if args.compare_prompt_copies:
        copies_s = float(np.median(seconds["copies"]))
        print(f"vital_jax, a prompt cache copy per completion:   median {copies_s * 1e3:8.1f} ms per rollout -> "
              f"{tokens / copies_s:9.1f} tokens/s ({copies_s / float(np.median(jax_s)):.2f}x the shared-prompt "
              f"time); XLA temporaries {rollout.temp_bytes / 2**20:.1f} MiB shared, {copies.temp_bytes / 2**20:.1f} "
              f"MiB copied ({copies.temp_bytes / rollout.temp_bytes:.2f}x)")
    print(f"transformers generate:                           median {np.median(hf_s) * 1e3:8.1f} ms "
          f"per rollout -> {hf_tps:9.1f} tokens/s")
    print(f"ratio vital_jax / transformers: {jax_tps / hf_tps:.2f}x tokens/s")


if __name__ == "__main__":
    main()
