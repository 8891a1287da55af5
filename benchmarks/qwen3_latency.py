"""Qwen3 prefill and decode-step latency: vital_jax (jitted) vs transformers PyTorch eager, same process.

    python -m benchmarks.qwen3_latency [--hidden 512 --layers 8 --prompt 128 --batch 1 --steps 32 --quick]

Both run the same random weights in float32 on this machine's CPU. Prints milliseconds and the ratio
torch / jax (> 1 means vital_jax is faster). Timings exclude JAX compilation (measured separately). Exits non-zero
when the two prefills' logits differ by more than 1e-3 (not the same computation). `--quick`: tiny sizes, one
timed run (the CI smoke test; its times mean nothing).
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.machine import quick_sizes
from conversion.torch_decoding import cache_keyword
from tests.hf_reference import save_tiny_qwen3
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, init_cache, load_params


QUICK = dict(hidden=64, layers=1, prompt=8, batch=1, steps=2, repeats=1)
# Beyond float32 summation-order differences (the parity tests hold the models to 1e-4 on logits).
SAME_COMPUTATION_TOLERANCE = 1e-3


def prefill_logit_diff(ours, theirs) -> float:
    """Largest |vital_jax - transformers| of two prefills' logits; exits when it is past SAME_COMPUTATION_TOLERANCE
    (a latency comparison of two different computations would mean nothing)."""
    diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))
    if not diff <= SAME_COMPUTATION_TOLERANCE:
        raise SystemExit(f"prefill logits differ by {diff:.2e} between vital_jax and transformers: "
                         "not the same computation")
    return diff


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed run, for the CI smoke test")
    args = parser.parse_args()
    args = quick_sizes(args, QUICK)

    path = tempfile.mkdtemp()
    heads = args.hidden // 64
    hf_model = save_tiny_qwen3(path, vocab_size=32000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                               intermediate_size=3 * args.hidden, tie_word_embeddings=False)
    hf_model = hf_model.to(torch.float32).eval()
    hf_model.config._attn_implementation = "sdpa"
    config = Qwen3Config.from_pretrained(path)
    params = jax.device_put(load_params(path, config))
    model = Qwen3ForCausalLM(config)
    ids = np.random.RandomState(0).randint(0, 32000, (args.batch, args.prompt))
    max_len = args.prompt + args.steps + 1

    @jax.jit
    def prefill(p, ids):
        return model.apply({"params": p}, input_ids=ids, kv_cache=init_cache(config, args.batch, max_len))

    @jax.jit
    def step(p, ids, cache):
        out = model.apply({"params": p}, input_ids=ids, kv_cache=cache)
        return out.logits, out.kv_cache

    jids = jnp.asarray(ids)
    t0 = time.perf_counter()
    out = jax.block_until_ready(prefill(params, jids))
    compile_prefill = time.perf_counter() - t0
    tok = jnp.zeros((args.batch, 1), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tok, out.kv_cache))
    compile_step = time.perf_counter() - t0

    jax_prefill = _median_ms(lambda: jax.block_until_ready(prefill(params, jids)), args.repeats)

    def jax_decode():
        cache = out.kv_cache
        for _ in range(args.steps):
            logits, cache = step(params, tok, cache)
        jax.block_until_ready(logits)

    jax_step = _median_ms(jax_decode, args.repeats) / args.steps

    tids = torch.tensor(ids)
    torch.set_grad_enabled(False)
    logit_diff = prefill_logit_diff(out.logits, hf_model(tids).logits.numpy())
    torch_prefill = _median_ms(lambda: hf_model(tids, use_cache=True), args.repeats)
    ttok = torch.zeros((args.batch, 1), dtype=torch.long)
    keyword = cache_keyword(hf_model)

    def torch_decode():
        past = getattr(hf_model(tids, use_cache=True), keyword)
        start = time.perf_counter()
        for i in range(args.steps):
            past = getattr(hf_model(ttok, use_cache=True, **{keyword: past}), keyword)
        return (time.perf_counter() - start) * 1e3

    torch_step = float(np.median([torch_decode() for _ in range(args.repeats)])) / args.steps

    print(f"config: hidden {args.hidden}, layers {args.layers}, prompt {args.prompt}, batch {args.batch}, "
          f"fp32, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    print(f"jax compile: prefill {compile_prefill:.2f}s, decode step {compile_step:.2f}s; prefill logits max "
          f"|jax - torch| {logit_diff:.1e}")
    print(f"prefill      jax {jax_prefill:8.2f} ms   torch {torch_prefill:8.2f} ms   "
          f"ratio torch/jax {torch_prefill / jax_prefill:5.2f}x")
    print(f"decode step  jax {jax_step:8.2f} ms   torch {torch_step:8.2f} ms   "
          f"ratio torch/jax {torch_step / jax_step:5.2f}x")


if __name__ == "__main__":
    main()
