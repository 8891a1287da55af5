"""What MedSynapse-V costs at inference against the plain backbone and VITAL, measured in the same run: latency
(batch 1, compile excluded, median of N interleaved runs) and peak memory per sample (XLA's buffer assignment of
each compiled program: argument + output + temp bytes).

    python -m benchmarks.medsynapse_latency [--hidden 256 --layers 4 --prompt 256 --answer 16 --repeats 15]
    python -m benchmarks.medsynapse_latency --quick        # tiny sizes: a few seconds, for CI

Four jitted programs answer the same one-image prompt with the same number of tokens (greedy, no EOS):

  backbone    the VLM alone: prefill, then decode (`memory.generate` with zero memory slots).
  teacher     MedSynapse-V with its encoder: F = E_ana(X) computed in the same program (a random SAM-1 ViT,
              `--encoder siglip` for a SigLIP tower), M = P_phi(F) (N = 16), prefill, the memory block, decode.
              This is inference before Stage III (and Stage III's privileged branch).
  deployed    MedSynapse-V as deployed (`deploy.make_generate`): M_auto = A_psi(the VLM's own visual tokens); no
              encoder, no P_phi in the program or its arguments.
  vital K=4   VITAL (`VitalModel.generate`, k_slots = 4): four sequential latent steps between prompt and answer.

Random tiny Qwen3-VL built in Flax (no torch), float32, LoRA merged (the deployed form; a merged model costs what
the base model costs). The default encoder is a small SAM-1 ViT (96-d, 4 blocks, two of them global, 256 px: a
16 x 16 x 64 feature map) sized so that its FLOPs are ~20% of the backbone's prompt prefill (XLA's count: 0.38 vs
1.87 GFLOP), about the share of SAM ViT-B at 1024 px (~1 TFLOP) in Qwen3-VL-8B's prefill of the same prompt
(~5 TFLOP with the vision tower). Decode steps cost far more, relative to the encoder, at 8B (memory-bound over
16 GB of weights) than here, so the teacher's latency overhead measured here is an upper bound for the 8B model.
Memory is the CPU backend's buffer assignment: exact for arguments (the weights) and outputs, indicative for
temporaries.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import xla_memory
from benchmarks.machine import quick_sizes
from vital_jax import demo_assets
from vital_jax.generation import SamplingConfig
from vital_jax.medsynapse import deploy
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.autonomous import AutonomousConfig, AutonomousMemory
from vital_jax.medsynapse.encoder import SamAnatomicalEncoder, SiglipAnatomicalEncoder
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, load_params
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.cached import prefix_inputs
from vital_jax.models.sam import SamPreprocessor, SamVisionConfig, SamVisionEncoder
from vital_jax.models.siglip import SiglipPreprocessor, SiglipVisionModel
from vital_jax.models.siglip.config import SiglipVisionConfig
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel

MIB = 2**20
MEMORY_FIELDS = ("argument", "output", "temp")
QUICK = dict(hidden=64, layers=1, prompt=48, grid=8, answer=4, repeats=1, encoder_image=64, encoder_hidden=32,
             encoder_layers=2, encoder_window=2)  # two encoder blocks: a windowed one and a global one


# ------------------------------------------------------------------------------------------ shared with grpo_throughput
def tiny_backbone(out_dir: str, hidden: int, layers: int, grid: int, seed: int = 0):
    """A random tiny Qwen3-VL written as a HF directory (config.json + safetensors, readable by transformers) and
    loaded back: returns (directory, config, Flax params). Head dim 32 (hidden >= 64) or 16."""
    head_dim = 32 if hidden >= 64 and hidden % 32 == 0 else 16
    hf = demo_assets.qwen3_vl_hf_config(hidden, layers, head_dim=head_dim)
    path = demo_assets.save_qwen3_vl(out_dir, hf, demo_assets.init_qwen3_vl_params(hf, seed, jit=True),
                                     image_pixels=(16 * grid) ** 2)
    config = Qwen3VLConfig.from_pretrained(path)
    return path, config, jax.device_put(load_params(path, config))


def image_prompts(config: Qwen3VLConfig, batch: int, prompt_len: int, grid: int, seed: int = 0):
    """`batch` prompts of exactly `prompt_len` tokens, each with one grid x grid-patch image in the middle
    (random text around it). Returns numpy (ids (B, Tp) int32, patches (B * grid^2, P) float32, grids (B, 3))."""
    n_img = grid * grid // 4
    text = prompt_len - n_img - 2
    if text < 2:
        raise ValueError(f"a {prompt_len}-token prompt cannot hold {n_img} image tokens and some text")
    rng = np.random.RandomState(seed)
    rows = [[int(t) for t in rng.randint(0, 400, text // 2)] + [config.vision_start_token_id]
            + [config.image_token_id] * n_img + [config.vision_end_token_id]
            + [int(t) for t in rng.randint(0, 400, text - text // 2)] for _ in range(batch)]
    patches = rng.randn(batch * grid * grid, config.vision.patch_dim).astype(np.float32)
    return np.asarray(rows, np.int32), patches, np.tile(np.asarray([[1, grid, grid]], np.int32), (batch, 1))


def compiled_memory(compiled) -> dict:
    """argument / output / temp bytes of a compiled program and their sum (the program's peak live bytes; no
    argument is donated here, so nothing aliases)."""
    out = xla_memory.memory_bytes(compiled, MEMORY_FIELDS)
    out["peak"] = sum(out[f] for f in MEMORY_FIELDS)
    return out


# ------------------------------------------------------------------------------------------------- the encoder
def build_encoder(args, seed: int = 3):
    """A random E_ana (SAM-1 ViT or SigLIP tower) and its params, at `--encoder_image` px."""
    size, hidden, layers = args.encoder_image, args.encoder_hidden, args.encoder_layers
    heads = max(1, hidden // 32)
    if args.encoder == "sam":
        config = SamVisionConfig(hidden_size=hidden, output_channels=args.encoder_channels, num_hidden_layers=layers,
                                 num_attention_heads=heads, image_size=size, patch_size=16, mlp_dim=4 * hidden,
                                 window_size=args.encoder_window,
                                 global_attn_indexes=tuple(range(1, layers, 2)))
        model = SamVisionEncoder(config)
        encoder = SamAnatomicalEncoder(model, SamPreprocessor(longest_edge=size, pad_size=size))
    else:
        config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, image_size=size, patch_size=16, use_head=False)
        model = SiglipVisionModel(config)
        encoder = SiglipAnatomicalEncoder(model, SiglipPreprocessor(height=size, width=size))
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), model.dummy_input())["params"]
    return encoder, params


# --------------------------------------------------------------------------------------------------- programs
def build_programs(args):
    """{name: (jitted fn, args tuple)} for the four inference programs, plus a description of the setup."""
    _, config, params = tiny_backbone(tempfile.mkdtemp(), args.hidden, args.layers, args.grid)
    # The layout evaluation decodes in (MemoryPredictor, Predictor), made once here; left to `cached.decode`'s
    # in-program relayout, every call would also pay for fusing the projections.
    config, params, _ = qwen3_vl_params.decoding_layout(config, params)
    backbone = Qwen3VLForConditionalGeneration(config)
    ids, patches, grids = image_prompts(config, 1, args.prompt, args.grid)
    prefix = prefix_inputs(ids, np.ones(ids.shape, bool), grids, patches, config)
    sampling = SamplingConfig(max_new_tokens=args.answer)  # greedy, no EOS: every program decodes `answer` tokens
    d = config.text.hidden_size

    encoder, encoder_params = build_encoder(args)
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=d, num_queries=args.memory,
                                                    num_heads=max(1, encoder.feature_dim // 32)))
    feature_shape = (1, *encoder.grid, encoder.feature_dim)
    sampler_params = jax.jit(sampler.init)(jax.random.PRNGKey(4), jnp.zeros(feature_shape))["params"]
    pixels = jnp.asarray(np.random.RandomState(5).randn(1, encoder.image_size, encoder.image_size, 3), jnp.float32)
    autonomous = AutonomousMemory(AutonomousConfig(hidden_size=d, num_queries=args.memory))
    autonomous_params = jax.jit(autonomous.init)(jax.random.PRNGKey(6), jnp.zeros((1, 4, d)),
                                                 jnp.ones((1, 4), bool))["params"]
    # VITAL's scaffolding (decoder, heads) is not part of inference; the decoder config only completes the model.
    decoder = Qwen3Config(vocab_size=config.text.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    vital = VitalModel(VitalConfig(k_max=args.k, lora=None), config, decoder)

    @jax.jit
    def backbone_alone(bp, pre):
        return memory_lib.generate(backbone, bp, pre, jnp.zeros((1, 0, d), jnp.float32), sampling)

    @jax.jit
    def teacher(bp, ep, sp, pre, px):
        feature_map = encoder.feature_map(ep, px)  # F = E_ana(X), in the program
        memory = sampler.apply({"params": sp}, feature_map)
        return memory_lib.generate(backbone, bp, pre, memory, sampling)

    deployed = deploy.make_generate(backbone, autonomous, sampling)

    @jax.jit
    def vital_generate(bp, pre, k):
        return vital.generate(bp, pre, k, sampling, k_slots=args.k)[:2]

    programs = {
        "backbone": (backbone_alone, (params, prefix)),
        "teacher": (teacher, (params, encoder_params, sampler_params, prefix, pixels)),
        "deployed": (deployed, ({"backbone": params, "autonomous": autonomous_params}, prefix)),
        f"vital K={args.k}": (vital_generate, (params, prefix, jnp.full((1,), args.k, jnp.int32))),
    }
    describe = (f"config: text hidden {d}, {args.layers} layers, prompt {args.prompt} tokens "
                f"({args.grid * args.grid // 4} image), answer {args.answer} tokens, N = {args.memory} memory "
                f"vectors; E_ana {args.encoder} {args.encoder_hidden}-d x {args.encoder_layers} blocks at "
                f"{encoder.image_size} px -> F {encoder.grid[0]}x{encoder.grid[1]}x{encoder.feature_dim}; fp32, "
                f"batch 1, {jax.devices()[0].platform}")
    return programs, describe


def measure(programs: dict, repeats: int) -> dict:
    """Compile each program (timed apart), one warm-up run, then `repeats` rounds with the programs interleaved so
    that load from other processes hits them alike. Returns {name: {compile_s, median_ms, min_ms, memory}}."""
    compiled, out = {}, {}
    for name, (fn, fn_args) in programs.items():
        start = time.perf_counter()
        compiled[name] = fn.lower(*fn_args).compile()
        out[name] = {"compile_s": time.perf_counter() - start, "memory": compiled_memory(compiled[name]),
                     "times_ms": []}
        jax.block_until_ready(compiled[name](*fn_args))
    for _ in range(repeats):
        for name, (_, fn_args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*fn_args))
            out[name]["times_ms"].append((time.perf_counter() - start) * 1e3)
    for m in out.values():
        m["median_ms"], m["min_ms"] = float(np.median(m["times_ms"])), float(np.min(m["times_ms"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--grid", type=int, default=28, help="image patches per side (28: a 448 x 448 image)")
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--memory", type=int, default=16, help="N, memory vectors (paper: 16)")
    p.add_argument("--k", type=int, default=4, help="VITAL's latent steps")
    p.add_argument("--encoder", choices=("sam", "siglip"), default="sam")
    p.add_argument("--encoder_image", type=int, default=256)
    p.add_argument("--encoder_hidden", type=int, default=96)
    p.add_argument("--encoder_layers", type=int, default=4)
    p.add_argument("--encoder_channels", type=int, default=64, help="SAM neck channels (ViT-B: 256)")
    p.add_argument("--encoder_window", type=int, default=8, help="SAM window size (ViT-B: 14)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a few seconds)")
    args = p.parse_args(argv)
    args = quick_sizes(args, QUICK)

    programs, describe = build_programs(args)
    results = measure(programs, args.repeats)
    print(describe)
    print(f"{'program':<11} {'median ms':>10} {'min ms':>8} {'compile s':>10} {'argument MiB':>13} "
          f"{'output MiB':>11} {'temp MiB':>9} {'peak MiB':>9}")
    for name, r in results.items():
        m = r["memory"]
        print(f"{name:<11} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {r['compile_s']:10.1f} "
              f"{m['argument'] / MIB:13.2f} {m['output'] / MIB:11.3f} {m['temp'] / MIB:9.2f} {m['peak'] / MIB:9.2f}")
    base = results["backbone"]
    for name, r in results.items():
        if name == "backbone":
            continue
        print(f"ratio {name} / backbone: latency {r['median_ms'] / base['median_ms']:.3f}x (of the minima "
              f"{r['min_ms'] / base['min_ms']:.3f}x), peak memory {r['memory']['peak'] / base['memory']['peak']:.3f}x")


if __name__ == "__main__":
    main()
