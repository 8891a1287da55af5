"""Where a VITAL train step spends its time, by model part and direction, from XLA's own per-op trace.

    python -m benchmarks.profile_train_step                  # the study's sizes (the shipped phantom VLM)
    python -m benchmarks.profile_train_step --lora_dropout 0 --latent_slots 0 --lambda_text 0
    python -m benchmarks.profile_train_step --quick          # tiny random model, one step (CI smoke test)
    python -m benchmarks.profile_train_step --peer           # peer_train_step's model and batch (issue #16)
    python -m benchmarks.profile_train_step --from_trace DIR # a step traced elsewhere (`mfu_8b --trace_dir`)

Method: the jitted step (`vital.train_step.train_step`, AdamW) runs `--steps` times under `jax.profiler` with
XLA:CPU's per-op trace events on (`--xla_cpu_enable_xprof_traceme`); every executed HLO op is attributed, through
the `op_name` metadata of the compiled program, to a part of the model (vision tower, attention, MLP, LoRA dropout,
LM head and loss, auxiliary decoder, ...) and to the forward pass (`jvp(...)`), the backward pass
(`transpose(jvp(...))`) or neither (optimizer, glue). Ops nested in a loop count once, inside the loop's op: the
latent `lax.scan` is one row holding everything its body runs. The table is ms per step and share of the summed
op time; the last line compares that sum with the step's wall time (the rest is dispatch; two ops running at
once on the two cores count twice).

`--from_trace DIR` attributes a step traced on another machine instead (`benchmarks.mfu_8b --trace_dir`, e.g. an
accelerator lease: DIR holds step.trace.json.gz and the optimized program step_hlo.txt.gz): the events of the
trace's device lanes ("/device:...", else the host's) are matched to HLO instructions by their `hlo_op` argument or
their name, and the table is ms of that one step (device time; no wall time). Unmatched time is printed apart.

Batches are synthetic with the study's shapes (`--batch`, `--prompt`, `--answer`, `--step_tokens`, a 96 x 96
image): every example has K = `--latent_slots` steps and full chains, so nothing is padding.
"""

from __future__ import annotations

import os
import sys

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    # Must be set before jax creates its CPU client; without it XLA:CPU emits no per-op events.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.machine import apply_host_setting  # noqa: E402

from vital_jax.layers.linear import LoraConfig  # noqa: E402
from vital_jax.models.qwen3 import Qwen3Config  # noqa: E402
from vital_jax.models.qwen3 import load_params as load_qwen3  # noqa: E402
from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params  # noqa: E402
from vital_jax.models.qwen3_vl import preprocessing  # noqa: E402
from vital_jax.vital import trainable  # noqa: E402
from vital_jax.vital.batch import from_numpy  # noqa: E402
from vital_jax.vital.config import VitalConfig  # noqa: E402
from vital_jax.vital.model import VitalModel  # noqa: E402
from vital_jax.vital.train_step import init_train_state, train_step  # noqa: E402

# (part, pattern on the op's op_name), first match wins: the order puts the specific before the general.
PARTS = (
    ("LoRA dropout (RNG + mask)", r"lora_dropout|Dropout|_bernoulli|threefry|random_bits"),
    # A loop's own event covers every op inside it: at the top level that is the latent scan (or, with
    # scan_layers, a layer stack), whatever its body holds.
    ("latent scan / scanned layers (whole loop)", r"/while$"),
    ("vision tower", r"/visual/|VisionModel|vision"),
    ("auxiliary decoder", r"Qwen3ForCausalLM|/decoder/|pj_in|PjIn"),
    ("visual projector", r"VisualProjector|visual_projector"),
    ("LoRA adapters", r"lora_"),
    ("attention projections", r"self_attn/(q|k|v|o)_proj"),
    ("attention (scores, softmax, rope, cache)", r"self_attn|attention|rotary|rope|kv_cache|cache"),
    ("MLP", r"/mlp/"),
    ("norms", r"norm"),
    ("LM head + task loss", r"lm_head|log_softmax|token_cross_entropy|task_loss"),
    # The steps update under jax.named_scope("optimizer") (`freeze.apply_update`): the fused ops carry no optax name.
    ("optimizer (AdamW, clipping)", r"/optimizer/|optax|adam|scale_by|clip|global_norm|apply_updates"),
)


def part_of(op_name: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, op_name):
            return part
    return "other (embedding, latent loop glue, casts)"


def direction_of(op_name: str) -> str:
    return "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "-"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata, for every instruction of the compiled program."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def top_level_op_events(trace: dict, names: dict[str, str]) -> list[dict]:
    """The trace's complete events that are HLO ops of the program, minus those nested in another such op on the
    same thread (a loop's body ops are inside the loop's own event)."""
    ops = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("name") in names),
                 key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"]))
    out, open_until = [], {}
    for e in ops:
        lane = (e["pid"], e["tid"])
        if e["ts"] < open_until.get(lane, -1.0):
            continue
        out.append(e)
        open_until[lane] = e["ts"] + e["dur"]
    return out


def attribute_trace(events: list[dict], names: dict[str, str]) -> tuple[dict, dict, float, float]:
    """A saved trace's events -> ({(part, direction): ms}, {op_name: ms}, matched ms, unmatched ms) over its device
    lanes (processes named "/device:..."; a GPU's kernels carry their HLO instruction in args["hlo_op"]) or, when it
    has none, the host's top-level op events (XLA:CPU's, named by instruction). `names`: `hlo_op_names` of the
    program that ran."""
    from benchmarks.mfu_8b import device_pids

    lanes = device_pids(events)
    if lanes:
        lane_events = [e for e in events if e.get("ph") == "X" and e.get("pid") in lanes]
    else:
        lane_events = top_level_op_events({"traceEvents": events}, names)
    table, by_op = collections.defaultdict(float), collections.defaultdict(float)
    unmatched = 0.0
    for e in lane_events:
        ms = e.get("dur", 0.0) / 1000
        instruction = e.get("args", {}).get("hlo_op") or e.get("name")
        op_name = names.get(instruction)
        if op_name is None:
            unmatched += ms
            continue
        table[(part_of(op_name), direction_of(op_name))] += ms
        by_op[op_name] += ms
    return dict(table), dict(by_op), sum(table.values()), unmatched


def print_table(table: dict, by_op: dict, total: float, top_ops: int) -> None:
    """The by-part table (forward / backward / other columns, ms and share of `total`), then the `top_ops` ops."""
    by_part = collections.defaultdict(float)
    for (part, _), ms in table.items():
        by_part[part] += ms
    print(f"{'part':44s} {'forward':>9s} {'backward':>9s} {'other':>9s} {'total ms':>9s} {'share':>6s}")
    for part in sorted(by_part, key=by_part.get, reverse=True):
        cells = [table.get((part, d), 0.0) for d in ("forward", "backward", "-")]
        print(f"{part:44s} " + " ".join(f"{c:9.2f}" for c in cells)
              + f" {by_part[part]:9.2f} {100 * by_part[part] / total:5.1f}%")
    for op_name in sorted(by_op, key=by_op.get, reverse=True)[:top_ops]:
        print(f"  {by_op[op_name]:7.2f} ms  [{part_of(op_name)}] {op_name[:150]}")


def from_trace(trace_dir: str, top_ops: int) -> None:
    """Attribute the one step `benchmarks.mfu_8b --trace_dir` kept in `trace_dir`."""
    with gzip.open(os.path.join(trace_dir, "step_hlo.txt.gz"), "rt") as f:
        names = hlo_op_names(f.read())
    with gzip.open(os.path.join(trace_dir, "step.trace.json.gz")) as f:
        events = json.load(f)["traceEvents"]
    table, by_op, total, unmatched = attribute_trace(events, names)
    print(f"traced step in {trace_dir}: {total:.1f} ms of events matched to the program's ops, {unmatched:.1f} ms "
          f"not matched")
    if total:
        print_table(table, by_op, total, top_ops)


def profile(step, args_fn, steps: int) -> tuple[dict, dict, float, float]:
    """Run `step(*args_fn())` `steps` times under the profiler -> ({(part, direction): ms per step}, {op_name: ms
    per step}, summed op ms per step, wall ms per step)."""
    compiled = step.lower(*args_fn()).compile()
    names = hlo_op_names(compiled.as_text())
    for _ in range(2):  # compile and warm up outside the trace
        jax.block_until_ready(step(*args_fn()))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step(*args_fn())
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t0) * 1000 / steps
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = top_level_op_events(trace, names)
    if not events:
        raise RuntimeError("the trace has no per-op events: was XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true "
                           "set before jax started (it is, when this script is run as a module)?")
    table, by_op = collections.defaultdict(float), collections.defaultdict(float)
    for e in events:
        op_name = names[e["name"]]
        table[(part_of(op_name), direction_of(op_name))] += e["dur"] / 1000 / steps
        by_op[op_name] += e["dur"] / 1000 / steps
    return dict(table), dict(by_op), sum(table.values()), wall


def build(args, tmp: str):
    """(model, params, numpy batch) at the requested sizes."""
    if args.peer:  # benchmarks.peer_train_step's model and batch (issue #16's sizes)
        from benchmarks.peer_train_step import PEER
        from benchmarks.train_step import build_hf, synthetic

        build_hf(tmp, PEER)
        backbone_dir, decoder_dir = f"{tmp}/backbone", f"{tmp}/decoder"
    elif args.quick:  # peer_train_step's smoke-test model: one layer per tower, every part of the step
        from benchmarks.train_step import QUICK, build_hf

        build_hf(tmp, QUICK)
        backbone_dir, decoder_dir = f"{tmp}/backbone", f"{tmp}/decoder"
    else:
        from vital_jax import assets

        pair = dict(assets.phantom_vlm())
        backbone_dir, decoder_dir = pair["backbone_dir"], pair["decoder_dir"]
    backbone_config = Qwen3VLConfig.from_pretrained(backbone_dir, attention_impl=args.attention_impl)
    decoder_config = Qwen3Config.from_pretrained(decoder_dir, attention_impl=args.attention_impl)
    cfg = VitalConfig(k_max=args.k_max, roi_dim=32, lambda_text=args.lambda_text, lambda_visual=args.lambda_visual,
                      lora=LoraConfig(args.lora_rank, 2.0 * args.lora_rank, args.lora_dropout))
    model = VitalModel(cfg, backbone_config, decoder_config)
    params = model.init_params(jax.random.PRNGKey(0), load_params(backbone_dir, backbone_config),
                               load_qwen3(decoder_dir, decoder_config))
    if args.peer:
        return model, params, synthetic(backbone_config.vision.patch_dim, sizes=PEER)
    return model, params, synthetic_batch(args, backbone_config, decoder_config.vocab_size)


def synthetic_batch(args, backbone_config, decoder_vocab: int) -> dict:
    rng = np.random.RandomState(0)
    # The pipeline's patch layout (vital_jax.models.qwen3_vl.preprocessing): 16-px patches, 2 x 2 merged.
    grid = args.image // preprocessing.PATCH_SIZE
    n_img = grid * grid // preprocessing.MERGE_SIZE ** 2
    b, k = args.batch, args.latent_slots
    text = args.prompt - n_img - 2
    if text < 1:
        raise ValueError(f"--prompt {args.prompt} cannot hold the image's {n_img} tokens")
    ids = preprocessing_ids(backbone_config)
    vocab = min(backbone_config.text.vocab_size, min(ids.values()))
    rows = [list(rng.randint(0, vocab, text // 2)) + [ids["vision_start"]] + [ids["image"]] * n_img
            + [ids["vision_end"]] + list(rng.randint(0, vocab, text - text // 2)) for _ in range(b)]
    patch_dim = 3 * preprocessing.TEMPORAL_PATCH_SIZE * preprocessing.PATCH_SIZE ** 2
    roi = rng.randn(b, 32).astype(np.float32)
    return dict(prompt_ids=np.asarray(rows, np.int32), prompt_valid=np.ones((b, args.prompt), bool),
                pixel_patches=rng.randn(b * grid * grid, patch_dim).astype(np.float32),
                image_grid_thw=np.asarray([[1, grid, grid]] * b, np.int32),
                answer_ids=rng.randint(0, vocab, (b, args.answer)).astype(np.int32),
                answer_valid=np.ones((b, args.answer), bool), latent_steps=np.full((b,), k, np.int32),
                step_ids=rng.randint(0, decoder_vocab, (b, k, args.step_tokens)).astype(np.int32),
                step_valid=np.ones((b, k, args.step_tokens), bool),
                roi_feature=roi / np.linalg.norm(roi, axis=1, keepdims=True), example_valid=np.ones((b,), bool))


def preprocessing_ids(backbone_config) -> dict:
    return {"image": backbone_config.image_token_id, "vision_start": backbone_config.vision_start_token_id,
            "vision_end": backbone_config.vision_end_token_id}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random model and batch, one step (CI smoke test)")
    p.add_argument("--peer", action="store_true",
                   help="benchmarks.peer_train_step's random model and batch (issue #16's sizes) instead of the "
                        "study's")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens, image included")
    p.add_argument("--image", type=int, default=96, help="image side in pixels")
    p.add_argument("--answer", type=int, default=48)
    p.add_argument("--step_tokens", type=int, default=64)
    p.add_argument("--k_max", type=int, default=4)
    p.add_argument("--latent_slots", type=int, default=4, help="slots the program runs (every example uses all)")
    p.add_argument("--lambda_text", type=float, default=1.0)
    p.add_argument("--lambda_visual", type=float, default=0.1)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--attention_impl", default="xla", choices=("xla", "dot_product"))
    p.add_argument("--top_ops", type=int, default=0, help="also list the N most expensive ops by op_name")
    p.add_argument("--from_trace", default="", help="attribute a step traced by `mfu_8b --trace_dir` in this folder")
    args = p.parse_args(argv)
    if args.from_trace:
        from_trace(args.from_trace, args.top_ops)
        return 0
    if args.quick:
        args.batch, args.prompt, args.image, args.answer, args.step_tokens, args.steps = 2, 32, 64, 8, 8, 1
    if args.peer:
        from benchmarks.peer_train_step import PEER

        args.batch, args.prompt, args.image, args.answer = PEER.batch, 5 + 2 + 196 + 9, 448, PEER.answer
        args.step_tokens, args.k_max, args.latent_slots, args.lora_rank = PEER.step_chain, 4, 4, PEER.lora_rank
    if not 0 <= args.latent_slots <= args.k_max:
        p.error(f"--latent_slots must be in 0..--k_max ({args.k_max})")
    print(apply_host_setting(), file=sys.stderr)  # as the training command runs
    with tempfile.TemporaryDirectory() as tmp:
        model, params, batch_np = build(args, tmp)
    optimizer = trainable.make_optimizer(1e-4, 0.01, max_grad_norm=1.0)
    # On the device once, as the trainer's `sharding.shard` does (numpy leaves would be copied in at every call).
    state, frozen = jax.device_put(init_train_state(params, optimizer, jax.random.PRNGKey(1)))
    batch = from_numpy(batch_np, model.backbone_config)
    step = jax.jit(functools.partial(train_step, model, optimizer))
    holder = {"state": state}

    def args_fn():
        return holder["state"], frozen, batch

    table, by_op, total, wall = profile(step, args_fn, args.steps)
    print(f"VITAL train step: batch {args.batch}, prompt {args.prompt}, answer {args.answer}, "
          f"{args.latent_slots} latent slots x {args.step_tokens} step tokens, LoRA r{args.lora_rank} "
          f"dropout {args.lora_dropout}, attention {args.attention_impl}, lambda_text {args.lambda_text}, "
          f"lambda_visual {args.lambda_visual}")
    print_table(table, by_op, total, args.top_ops)
    print(f"summed op time {total:.1f} ms per step; wall {wall:.1f} ms per step "
          f"(ratio {total / wall:.2f})")


if __name__ == "__main__":
    sys.exit(main())
