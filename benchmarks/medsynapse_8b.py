"""Per-device memory and compile time of MedSynapse-V's three training programs at Qwen3-VL-8B shapes, from XLA's own
buffer assignment, without any weights.

Lowers and compiles, on a simulated 8-device CPU mesh with every parameter, optimizer state and feature map
abstract (ShapeDtypeStructs carrying the NamedShardings of `vital_jax.sharding`'s rules; nothing of size 8B is
ever allocated):

  Stage I    `stage1.make_train_step`: P_phi (N = 16, 2 layers) on the frozen backbone, Eq. (2).
  Stage II   the GRPO update (`grpo.grpo_functions(...).update`, Eq. 3): LoRA r64 on q, k, v, o, rollout-batch
             shapes (32 prompts x G = 4 trajectories of `--new_tokens`, paper: 1,024) scored teacher forced with
             M inside the differentiated loss, one AdamW step. Each prompt's cache is shared by its G trajectories
             (`GRPOConfig.shared_prompt_cache`; `--stage2_prompt_copies`: a copy per trajectory, for comparison).
  Stage II rollout  `grpo.grpo_functions(...).rollout`: M and M' from P_phi, one prefill per prompt, G sampled
             completions of `--new_tokens` in the on-device decode loop (the same prompt-cache switch).
  Stage III  `imt.make_train_step`: the student's on-policy rollout (`--new_tokens`), both branches' full-vocabulary
             logits, Eq. (7)-(8), one AdamW step on A_psi.

Backbone bf16 (frozen; Stage II's adapters, P_phi and A_psi fp32 master weights), bf16 compute, remat, scanned
decoder layers. E_ana's output is a batch input, as in training (`features.py` stores it): the SAM-1 ViT-B feature
map, 64 x 64 x 256 per image, float16 (configs/medsynapse_qwen3vl_8b.py's store dtype). Prompts of `--prompt_len`
tokens with one 448 x 448 image (196 tokens), packed as training packs them (`distributed.global_vital_batch`).
Global batch 8 (1 per device) for Stages I and III, 32 prompts (4 per device, 16 trajectories) for Stage II.

    python -m benchmarks.medsynapse_8b                          # full depth: ~20 s per stage on 2 CPU cores
    python -m benchmarks.medsynapse_8b --layers 2 4             # truncated backbones, extrapolated to 36 layers
    python -m benchmarks.medsynapse_8b --new_tokens 256         # shorter rollouts than the paper's 1,024
    python -m benchmarks.medsynapse_8b --quick                  # the shipped tiny Qwen3-VL: checks the script (CI)

The text layers are one `nn.scan`, so full depth compiles about as fast as a truncated model. With `--layers N1 N2`
each stage compiles at N1 and N2 text layers and each memory figure is fitted as a + b * L and evaluated at 36 (the
vision tower keeps its 27 blocks); take N1 >= 2: XLA compiles a one-step scan differently (its temporaries at one
layer exceed those at two). The sharding rules are checked on every stage's trainable and frozen trees: leaves
without a rule and dimensions that fell back to replication are listed. Each program's collectives are counted per
device (`benchmarks.xla_collectives`): per call, and per decode step for the rollouts' token loops, which shows
what a layout costs in communication (`--rollout_relayout true|false|auto`: the layout Stages II and III decode in;
auto is the library's default, held under FSDP).

Caveats (as benchmarks/memory_8b.py): this is the CPU backend's buffer assignment. XLA:CPU has no bf16 matmul and
its while-loop-invariant code motion would hoist an f32 copy of every stacked bf16 weight out of the layer scan,
which GPU/TPU backends do not make; the pass is disabled on CPU (`--keep_licm` keeps it). Temporaries are indicative,
argument and output sizes exact. No argument is donated (the programs are compiled exactly as the stages jit them),
so a step's new trainable state is counted as output beside its input: a few hundred MiB at most here.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--keep_licm" not in sys.argv:
    os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import xla_collectives, xla_memory  # noqa: E402
from benchmarks.machine import quick_sizes  # noqa: E402
from benchmarks.mfu_8b import synthetic_batch  # noqa: E402
from vital_jax import assets, distributed, sharding  # noqa: E402
from vital_jax.medsynapse import grpo, imt, stage1  # noqa: E402
from vital_jax.medsynapse.autonomous import AutonomousConfig, AutonomousMemory  # noqa: E402
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig  # noqa: E402
from vital_jax.models.qwen3_vl import params as qwen3_vl_params  # noqa: E402
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig  # noqa: E402
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration  # noqa: E402

GIB, MIB = 2**30, 2**20
H100_BYTES = 80e9
FIELDS = ("argument", "output", "temp", "generated_code")
COLLECTIVE_FIELDS = ("collectives_program", "collectives_per_decode_step")
RELAYOUT = {"auto": None, "true": True, "false": False}   # --rollout_relayout -> GRPOConfig / imt relayout
FULL_LAYERS = 36
STAGES = ("stage1", "stage2", "stage2_rollout", "stage3")
QUICK = dict(prompt_len=64, grid=8, answer_len=8, new_tokens=8, batch=8, stage2_prompts=8, generations=2,
             feature_grid=8, feature_dim=32, sampler_heads=4)


def backbone_config(args, layers: int) -> Qwen3VLConfig:
    """Qwen3-VL-8B (or, --quick, the shipped phantom VLM's backbone) with `layers` text layers: bf16, remat,
    scanned layers."""
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", remat=True, scan_layers=True)
    # The quick model's config.json is read as the 8B's is: building one with transformers' config classes would
    # import torch (seconds) for nothing else.
    model_dir = assets.phantom_vlm()["backbone_dir"] if args.quick else args.backbone_config
    config = Qwen3VLConfig.from_pretrained(model_dir, **kw)
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=layers))


def abstract_sharded(tree, mesh, report_name: str, reports: dict):
    """(ShapeDtypeStructs with the rules' NamedShardings, the shardings); the rules' report kept under a name."""
    shardings, report = sharding.tree_shardings(tree, mesh)
    reports[report_name] = report
    return sharding.abstract_with_shardings(tree, shardings), shardings


def abstract_batch(batch, mesh):
    """A batch (concrete arrays and ShapeDtypeStructs) as ShapeDtypeStructs with the batch rules' shardings."""
    shardings, _ = sharding.batch_shardings(batch, mesh)
    return sharding.abstract_with_shardings(batch, shardings)


class Shapes:
    """The shared inputs of the three stages at one depth: prompts (a packed global batch), feature maps, modules."""

    def __init__(self, args, mesh, layers: int):
        self.args, self.mesh = args, mesh
        self.config = backbone_config(args, layers)
        self.d = self.config.text.hidden_size
        self.feature = (args.feature_grid, args.feature_grid, args.feature_dim)
        self.sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=self.d, num_queries=args.memory,
                                                             num_heads=args.sampler_heads))
        self.sampler_params = jax.eval_shape(self.sampler.init, jax.random.PRNGKey(0),
                                             jnp.zeros((1, *self.feature), jnp.float32))["params"]

    def prompts(self, batch: int):
        """(prefix, answer_ids, answer_valid, example_valid) of `batch` image prompts, sharded like training's."""
        a = self.args
        np_batch = synthetic_batch(self.config, batch, a.prompt_len, a.grid, a.answer_len, 1, 1, 1)
        vb = distributed.global_vital_batch(np_batch, self.config, self.mesh)
        return vb.prefix, vb.answer_ids, vb.answer_valid, vb.example_valid

    def feature_map(self, batch: int):
        return jax.ShapeDtypeStruct((batch, *self.feature), jnp.dtype(self.args.feature_dtype))


def stage1_program(shapes: Shapes, reports: dict):
    """Stage I's jitted train step and its abstract (state, frozen, batch)."""
    backbone = Qwen3VLForConditionalGeneration(shapes.config)
    params = {"sampler": shapes.sampler_params, "backbone": qwen3_vl_params.abstract_params(shapes.config)}
    optimizer = stage1.make_optimizer()
    state, frozen = jax.eval_shape(lambda p: stage1.init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    prefix, answer_ids, answer_valid, example_valid = shapes.prompts(shapes.args.batch)
    batch = stage1.WarmupBatch(prefix, shapes.feature_map(shapes.args.batch), answer_ids, answer_valid,
                               example_valid)
    state, _ = abstract_sharded(state, shapes.mesh, "stage1 trainable state (P_phi)", reports)
    frozen, _ = abstract_sharded(frozen, shapes.mesh, "stage1 frozen (backbone)", reports)
    step = stage1.make_train_step(backbone, shapes.sampler, optimizer)
    return step, (state, frozen, abstract_batch(batch, shapes.mesh))


def _stage2_inputs(shapes: Shapes, reports: dict):
    """Stage II's modules, GRPO config, abstract (state, frozen) and prompt batch, shared by its two programs."""
    a = shapes.args
    backbone = Qwen3VLForConditionalGeneration(shapes.config, grpo.STAGE2_LORA)
    params = {"sampler": shapes.sampler_params,
              "backbone": qwen3_vl_params.abstract_params(shapes.config, grpo.STAGE2_LORA)}
    optimizer = grpo.make_optimizer()
    state, frozen = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    b = a.stage2_prompts
    prefix, _, _, example_valid = shapes.prompts(b)
    sds = jax.ShapeDtypeStruct
    batch = grpo.PromptBatch(prefix=prefix, feature_map=shapes.feature_map(b),
                             region_masks=sds((b, 1, *shapes.feature[:2]), jnp.bool_),
                             region_confidence=sds((b, 1), jnp.float32), region_valid=sds((b, 1), jnp.bool_),
                             example_valid=example_valid)
    state, _ = abstract_sharded(state, shapes.mesh, "stage2 trainable state (LoRA r64 q,k,v,o)", reports)
    frozen, _ = abstract_sharded(frozen, shapes.mesh, "stage2 frozen (P_phi, backbone)", reports)
    config = grpo.GRPOConfig(num_generations=a.generations, max_new_tokens=a.new_tokens,
                             shared_prompt_cache=not a.stage2_prompt_copies,
                             rollout_relayout=RELAYOUT[a.rollout_relayout])
    fns = grpo.grpo_functions(backbone, shapes.sampler, config, optimizer)
    return fns, state, frozen, abstract_batch(batch, shapes.mesh)


def stage2_program(shapes: Shapes, reports: dict):
    """Stage II's jitted GRPO update and its abstract (state, frozen, batch, rollout, old_log_probs, advantages)."""
    a = shapes.args
    fns, state, frozen, batch = _stage2_inputs(shapes, reports)
    b, g, t = a.stage2_prompts, a.generations, a.new_tokens
    r = b * g
    sds = jax.ShapeDtypeStruct
    memory = sds((b, a.memory, shapes.d), jnp.float32)
    rollout = grpo.Rollout(memory=memory, counterfactual_memory=memory, tokens=sds((r, t), jnp.int32),
                           valid=sds((r, t), jnp.bool_), lengths=sds((r,), jnp.int32))
    per_trajectory = abstract_batch({"old_log_probs": sds((r, t), jnp.float32), "advantages": sds((r,), jnp.float32)},
                                    shapes.mesh)
    return fns.update, (state, frozen, batch, abstract_batch(rollout, shapes.mesh), per_trajectory["old_log_probs"],
                        per_trajectory["advantages"], None)


def stage2_rollout_program(shapes: Shapes, reports: dict):
    """Stage II's jitted rollout (M and M', one prefill per prompt, G sampled completions of `--new_tokens` in the
    decode loop) and its abstract (trainable, frozen, batch, rng)."""
    fns, state, frozen, batch = _stage2_inputs(shapes, reports)
    return fns.rollout, (state.params, frozen, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))


def stage3_program(shapes: Shapes, reports: dict):
    """Stage III's jitted IMT train step and its abstract (state, frozen, batch)."""
    a = shapes.args
    backbone = Qwen3VLForConditionalGeneration(shapes.config)  # Stage II's LoRA merged
    autonomous = AutonomousMemory(AutonomousConfig(hidden_size=shapes.d, num_queries=a.memory))
    psi = jax.eval_shape(autonomous.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, shapes.d)),
                         jnp.ones((1, 4), bool))["params"]
    params = {"backbone": qwen3_vl_params.abstract_params(shapes.config), "sampler": shapes.sampler_params,
              "autonomous": psi}
    optimizer = imt.make_optimizer()
    state, frozen = jax.eval_shape(lambda p: imt.init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    prefix, _, _, example_valid = shapes.prompts(a.batch)
    batch = imt.IMTBatch(prefix, shapes.feature_map(a.batch), example_valid)
    state, _ = abstract_sharded(state, shapes.mesh, "stage3 trainable state (A_psi)", reports)
    frozen, _ = abstract_sharded(frozen, shapes.mesh, "stage3 frozen (backbone, P_phi)", reports)
    eos = shapes.config.text.eos_token_ids or (0,)
    step = imt.make_train_step(backbone, shapes.sampler, autonomous, optimizer,
                               imt.rollout_sampling(tuple(eos), a.new_tokens), relayout=RELAYOUT[a.rollout_relayout])
    return step, (state, frozen, abstract_batch(batch, shapes.mesh))


PROGRAMS = {"stage1": stage1_program, "stage2": stage2_program, "stage2_rollout": stage2_rollout_program,
            "stage3": stage3_program}


def compile_memory(args, mesh, stage: str, layers: int, reports: dict) -> dict:
    """Lower + compile one stage's program at `layers` text layers; per-device bytes, timings and the bytes its
    collectives move per device: once per program, and per iteration of its decode loops (Stages II's rollout and
    III: loops that stop at EOS, so XLA knows no trip count)."""
    with jax.set_mesh(mesh):
        shapes = Shapes(args, mesh, layers)
        fn, fn_args = PROGRAMS[stage](shapes, reports)
    compiled, measured = xla_memory.compile_measured(fn, fn_args, FIELDS, mesh)
    moved = xla_collectives.collective_bytes(compiled.as_text())
    measured["collectives_program"] = float(sum(moved["program"].values()))
    measured["collectives_per_decode_step"] = float(sum(sum(c.values()) for c in moved["loops"].values()))
    measured["decode_loops"] = len(moved["loops"])
    return measured


def peak(m: dict) -> float:
    """Live bytes at the program's peak: arguments + outputs + temporaries + code (nothing donated)."""
    return m["argument"] + m["output"] + m["temp"] + m["generated_code"]


def fit(points: dict, target: int) -> dict:
    """m = a + b * L per field through two (L, m) points, evaluated at `target`; also b per field."""
    (l1, m1), (l2, m2) = sorted(points.items())
    out = {}
    out["decode_loops"] = m2["decode_loops"]
    for f in FIELDS + COLLECTIVE_FIELDS:
        slope = (m2[f] - m1[f]) / (l2 - l1)
        out[f] = m1[f] + slope * (target - l1)
        out[f"{f}_per_layer"] = slope
    return out


def size(n: float) -> str:
    return f"{n / GIB:6.2f} GiB" if abs(n) >= GIB / 10 else f"{n / MIB:6.1f} MiB"


def report(name: str, m: dict) -> None:
    p = peak(m)
    fits = "fits" if p < H100_BYTES else "does NOT fit"
    print(f"  {name}: argument {size(m['argument'])} | output {size(m['output'])} | temp {size(m['temp'])} | code "
          f"{size(m['generated_code'])} -> peak {size(p)}/device: {fits} in an 80 GB H100 (headroom "
          f"{(H100_BYTES - p) / GIB:+.1f} GiB)")
    if m["decode_loops"]:
        print(f"    collectives per device: {size(m['collectives_per_decode_step']).strip()} per decode step "
              f"({m['collectives_per_decode_step']:.0f} bytes), {size(m['collectives_program']).strip()} once per "
              f"call (outside the decode loop)")
    elif m["collectives_program"]:
        print(f"    collectives per device: {size(m['collectives_program']).strip()} per call")


def sharding_check(reports: dict) -> None:
    """Which leaves of the trainable / frozen trees the rules did not shard as asked. Parameters only: the
    optimizer's step counters and the rng key are scalars or tiny and replicated by design."""
    for name, r in reports.items():
        params = [u for u, n in zip(r.unmatched, r.unmatched_sizes) if n > 2 and "count" not in u.split(" ")[0]
                  and not u.startswith("rng ")]
        fallbacks = len(r.fallbacks)
        line = "every parameter has a rule" if not params else f"{len(params)} parameter(s) WITHOUT a rule: {params}"
        print(f"  {name}: {line}; {fallbacks} dimension(s) fell back to replication"
              + (f" (e.g. {r.fallbacks[0]})" if fallbacks else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone_config", default="configs/hf/qwen3_vl_8b_instruct")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--mesh", type=int, nargs=3, default=(1, 8, 1), metavar=("DATA", "FSDP", "TENSOR"))
    p.add_argument("--batch", type=int, default=8, help="global batch of Stages I and III (over 8 devices)")
    p.add_argument("--stage2_prompts", type=int, default=32, help="Stage II rollout batch in prompts (paper: 32)")
    p.add_argument("--generations", type=int, default=4, help="G (paper: 4)")
    p.add_argument("--stage2_prompt_copies", action="store_true",
                   help="Stage II with a copy of the prompt cache per completion (GRPOConfig.shared_prompt_cache "
                        "False), for comparison")
    p.add_argument("--new_tokens", type=int, default=1024, help="rollout length of Stages II and III (paper: 1,024)")
    p.add_argument("--prompt_len", type=int, default=1024, help="prompt tokens incl. the image")
    p.add_argument("--grid", type=int, default=28, help="image patches per side (28: 448 x 448, 196 tokens)")
    p.add_argument("--answer_len", type=int, default=256, help="Stage I reference answer tokens")
    p.add_argument("--memory", type=int, default=16, help="N")
    p.add_argument("--feature_grid", type=int, default=64, help="E_ana grid side (SAM ViT-B at 1024 px: 64)")
    p.add_argument("--feature_dim", type=int, default=256, help="E_ana channels (SAM neck: 256)")
    p.add_argument("--feature_dtype", default="float16")
    p.add_argument("--sampler_heads", type=int, default=8)
    p.add_argument("--layers", type=int, nargs=2, metavar=("N1", "N2"),
                   help="compile at N1 and N2 text layers and extrapolate linearly to 36")
    p.add_argument("--keep_licm", action="store_true",
                   help="keep XLA:CPU's while-loop-invariant code motion (hoists f32 copies of all bf16 weights)")
    p.add_argument("--rollout_relayout", choices=tuple(RELAYOUT), default="auto",
                   help="the layout Stages II and III decode in (medsynapse.rollout_relayout; auto: the default)")
    p.add_argument("--quick", action="store_true",
                   help="the shipped tiny Qwen3-VL (vital_jax.assets) at 2 layers and small shapes (checks the script)")
    args = p.parse_args(argv)
    args = quick_sizes(args, QUICK)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {STAGES}")

    mesh = sharding.make_mesh(tuple(args.mesh))
    model = "the phantom VLM's tiny Qwen3-VL (--quick)" if args.quick else "Qwen3-VL-8B"
    print(f"jax {jax.__version__}, {jax.device_count()} simulated {jax.devices()[0].platform} devices, mesh "
          f"{tuple(args.mesh)} (data, fsdp, tensor); {model}, bf16 frozen backbone, remat, scanned layers; prompt "
          f"{args.prompt_len} tokens ({args.grid ** 2 // 4} image), E_ana feature map {args.feature_grid}x"
          f"{args.feature_grid}x{args.feature_dim} {args.feature_dtype}, N = {args.memory}; Stage I/III batch "
          f"{args.batch}, Stage I answers {args.answer_len} tokens; Stage II {args.stage2_prompts} prompts x G = "
          f"{args.generations}; rollouts {args.new_tokens} tokens")
    target = 2 if args.quick else FULL_LAYERS
    summary = {}
    for stage in stages:
        reports: dict = {}
        print(f"{stage}:")
        if args.layers is None:
            m = compile_memory(args, mesh, stage, target, reports)
            report(f"{target} layers (measured, {m['lower_s']:.0f}s lower + {m['compile_s']:.0f}s compile)", m)
            summary[stage] = (m, m["lower_s"] + m["compile_s"], "measured")
        else:
            points = {}
            for layers in args.layers:
                m = compile_memory(args, mesh, stage, layers, reports)
                points[layers] = m
                report(f"{layers:2d} layers (measured, {m['lower_s']:.1f}s lower + {m['compile_s']:.1f}s compile)",
                       m)
            est = fit(points, target)
            print(f"  per text layer: argument {size(est['argument_per_layer'])}, output "
                  f"{size(est['output_per_layer'])}, temp {size(est['temp_per_layer'])}")
            report(f"{target} layers (EXTRAPOLATED linearly per layer)", est)
            deepest = points[max(points)]
            summary[stage] = (est, deepest["lower_s"] + deepest["compile_s"], f"extrapolated; compile measured at "
                              f"{max(points)} layers")
        sharding_check(reports)
    print(f"summary, per device at {target} layers:")
    for stage, (m, seconds, how) in summary.items():
        print(f"  {stage}: peak {size(peak(m)).strip()} (argument {size(m['argument']).strip()}, output "
              f"{size(m['output']).strip()}, temp {size(m['temp']).strip()}; {how}), lower + compile {seconds:.1f}s")


if __name__ == "__main__":
    main()
