"""What the latent loop costs at inference: latency for K = 0..4 (prefix + K latent steps + a fixed-length
answer) and one latent step against one ordinary decode step, measured in the same run.

    python -m benchmarks.latent_overhead [--hidden 256 --layers 4 --prompt 256 --answer 16 --repeats 5 --k_max 4
                                          --quick]

A latent step is a single-position forward fed a vector instead of a token id, so it should cost what a decode
step costs (goal: <= 1.1x); the paper reports K = 4 adding ~9% over K = 0 at 8B. Random tiny Qwen3-VL (built in
Flax, no torch), float32, one 448x448-sized image grid. `--quick`: tiny sizes, K up to 1, one timed run (the CI
smoke test; its times mean nothing).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import quick_sizes
from vital_jax import demo_assets
from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.vital import latent
from vital_jax.vital.batch import prefix_inputs

QUICK = dict(hidden=64, layers=1, prompt=24, answer=2, grid=4, repeats=1, k_max=1)


def best_ms(fns: dict, rounds: int) -> dict:
    """Best-of-N wall time of each function, the functions interleaved round by round so that load from other
    processes affects them alike (the minimum is the least disturbed run)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--grid", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k_max", type=int, default=4, help="latency for K = 0..k_max")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one timed run, for the CI smoke test")
    args = p.parse_args()
    args = quick_sizes(args, QUICK)

    # The random weights initialised by one compiled program (op by op, the quick variant spent 12 s here).
    hf = demo_assets.qwen3_vl_hf_config(args.hidden, args.layers)
    path = demo_assets.save_qwen3_vl(tempfile.mkdtemp(), hf, demo_assets.init_qwen3_vl_params(hf, jit=True),
                                     image_pixels=(16 * args.grid) ** 2)
    config = Qwen3VLConfig.from_pretrained(path)
    # In the layout evaluation decodes in (`inference.Predictor`), made once on the host.
    config, params, _ = qwen3_vl_params.decoding_layout(config, load_params(path, config))
    params = jax.device_put(params)
    from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

    backbone = Qwen3VLForConditionalGeneration(config)
    n_img = args.grid * args.grid // 4
    rng = np.random.RandomState(0)
    text = args.prompt - n_img - 2
    row = ([int(t) for t in rng.randint(0, 400, text // 2)] + [config.vision_start_token_id]
           + [config.image_token_id] * n_img + [config.vision_end_token_id]
           + [int(t) for t in rng.randint(0, 400, text - text // 2)])
    ids = np.asarray([row], np.int32)
    patches = rng.randn(args.grid * args.grid, config.vision.patch_dim).astype(np.float32)
    prefix = prefix_inputs(ids, np.ones(ids.shape, bool), np.asarray([[1, args.grid, args.grid]]), patches, config)
    # No EOS: every K decodes exactly `answer` tokens, so the comparison isolates the latent steps.
    sampling = SamplingConfig(max_new_tokens=args.answer)
    k_max = args.k_max

    # Per-K programs (k_slots = K, what evaluation uses) and the shared K_max program (what training uses:
    # one compile for every K, masked steps still computed).
    infer = jax.jit(lambda bp, pre, k, slots: latent.generate_answer(backbone, bp, pre, k, slots, sampling)[0],
                    static_argnums=(3,))
    fns = {}
    for k in range(k_max + 1):
        kk = jnp.full((1,), k, jnp.int32)
        fns[("per_k", k)] = lambda kk=kk, k=k: infer(params, prefix, kk, k)
        fns[("shared", k)] = lambda kk=kk: infer(params, prefix, kk, k_max)
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile, and a warm-up run
    best = best_ms(fns, args.repeats)
    latencies = {k: best[("per_k", k)] for k in range(k_max + 1)}
    shared = {k: best[("shared", k)] for k in range(k_max + 1)}

    # One latent step vs one decode step, on the same filled cache.
    cache_len = ids.shape[1] + k_max + args.answer + 2
    # Generation's cache layout (one stacked array), as `generate_answer` prefills it.
    kv, z0 = jax.jit(lambda bp, pre: latent.encode_prefix(backbone, bp, pre, cache_len, per_layer_cache=False)
                     )(params, prefix)

    @jax.jit
    def latent_step(bp, kv, z):
        out = backbone.apply({"params": bp}, inputs_embeds=z[:, None], kv_cache=kv, return_logits=False)
        return out.hidden_states[:, 0], out.kv_cache

    @jax.jit
    def decode_step(bp, kv, tok):
        out = backbone.apply({"params": bp}, input_ids=tok, kv_cache=kv)
        return out.logits[:, -1], out.kv_cache

    tok = jnp.zeros((1, 1), jnp.int32)
    jax.block_until_ready(latent_step(params, kv, z0))
    jax.block_until_ready(decode_step(params, kv, tok))
    steps = best_ms({"latent": lambda: latent_step(params, kv, z0)[0],
                      "decode": lambda: decode_step(params, kv, tok)[0]}, args.repeats * 4)
    t_latent, t_decode = steps["latent"], steps["decode"]

    print(f"config: text hidden {args.hidden}, {args.layers} layers, prompt {args.prompt} tokens ({n_img} image), "
          f"answer {args.answer} tokens, fp32, {jax.devices()[0].platform}")
    for k, ms in sorted(latencies.items()):
        print(f"K={k}: {ms:8.2f} ms  ({ms / latencies[0]:.3f}x K=0)   shared K_max program: {shared[k]:8.2f} ms")
    print(f"latent step {t_latent:.2f} ms vs decode step {t_decode:.2f} ms: ratio {t_latent / t_decode:.2f}x "
          f"(the decode step also computes vocabulary logits)")


if __name__ == "__main__":
    main()
