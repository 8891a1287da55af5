"""Subprocess side of tests/test_sharding.py and tests/test_multiprocess.py (prints one JSON line per result).

It must own its process: the device count (XLA_FLAGS) and `jax.distributed` are fixed before jax starts, which a
pytest process that already imported jax cannot do.

  python tests/multiprocess_worker.py meshes --devices 8 --meshes 8,1,1 2,4,1 2,2,2 --ckpt DIR
      one VITAL train step on one device and on each mesh; parameter specs; orbax save on the first mesh and
      restore onto the others.
  python tests/multiprocess_worker.py reference --steps 2
      the two-step single-process, single-device run that the multi-process run must reproduce.
  python tests/multiprocess_worker.py process --process_id I --num_processes N --coordinator HOST:PORT
      one process of an N-process run (local devices from --devices), its share of the global batch.

The tiny VITAL model is built from configs (no transformers import, to keep start-up short); its dimensions
divide data/fsdp/tensor meshes of 8 devices and the global batch has 8 examples.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import json
import os
import sys
import time
import zlib


def _setup_env(devices: int) -> None:
    """Fix the CPU device count before jax starts; the suite's fast-compile flags (tests/fast_compile.py) apply
    equally to the reference and the sharded runs."""
    from tests import fast_compile

    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{fast_compile.added_to(flags)} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:
        raise RuntimeError("multiprocess_worker must set up XLA_FLAGS before jax is imported")


def _emit(kind: str, **payload) -> None:
    print(json.dumps({"kind": kind, **payload}), flush=True)


# ------------------------------------------------------------------------------------------------- tiny setup
IMG, VS, VE, IM_END = 60, 58, 59, 57
GRIDS = ((1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 2, 2), (1, 4, 4), (1, 2, 2), (1, 2, 6), (1, 2, 2))  # 60 patches
LATENT_STEPS = (2, 1, 2, 0, 2, 1, 2, 2)


def tiny_model():
    from vital_jax.layers.linear import LoraConfig
    from vital_jax.models.qwen3 import Qwen3Config
    from vital_jax.models.qwen3_vl import Qwen3VLConfig
    from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig
    from vital_jax.vital.config import VitalConfig
    from vital_jax.vital.model import VitalModel

    text = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=5e6)
    vision = Qwen3VLVisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                                 num_position_embeddings=16, deepstack_visual_indexes=(0,), patch_size=4,
                                 temporal_patch_size=1, in_channels=1)
    backbone = Qwen3VLConfig(text=text, vision=vision, mrope_section=(2, 1, 1), image_token_id=IMG,
                             video_token_id=61, vision_start_token_id=VS, vision_end_token_id=VE)
    decoder = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    # LoRA dropout off (its ~30 mask sites cost a quarter of the compile time); the visual projector's dropout
    # stays, so the sharded runs still have to reproduce the one-device random masks.
    cfg = VitalConfig(k_max=2, roi_dim=8, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0), vp_dropout=0.1)
    return VitalModel(cfg, backbone, decoder)


def tiny_params(model):
    """Random parameters; LoRA B and norm scales perturbed so every trainable leaf gets a gradient at step 1.

    Built under one jit: run eagerly, the `init` forward passes compile each of their ~500 operations separately,
    which took ~15 s of every worker process."""
    import jax
    import jax.numpy as jnp

    backbone = model.backbone
    vis = model.backbone_config.vision

    def perturb(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        seed = jax.random.fold_in(jax.random.PRNGKey(2), zlib.crc32(name.encode()) % (1 << 30))
        if name.endswith("lora_b"):
            return 0.05 * jax.random.normal(seed, x.shape, x.dtype)
        if name.endswith("scale"):
            return x + 0.1 * jax.random.normal(seed, x.shape, x.dtype)
        return x

    @jax.jit
    def build():
        key = jax.random.PRNGKey(0)
        text = backbone.init(key, input_ids=jnp.zeros((1, 1), jnp.int32))["params"]
        visual = backbone.init(key, jnp.zeros((vis.merge_unit, vis.patch_dim)), ((1, 2, 2),),
                               method=backbone.encode_images)["params"]["visual"]
        params = model.init_params(jax.random.PRNGKey(1), {**text, "visual": visual})
        return jax.tree_util.tree_map_with_path(perturb, params)

    return build()


def scan_layout(model, params):
    """The same model and parameters with `scan_layers` (and remat) in both decoders."""
    import dataclasses

    from vital_jax.models.qwen3 import params as qwen3_params
    from vital_jax.models.qwen3_vl import params as qwen3_vl_params

    text = dataclasses.replace(model.backbone_config.text, scan_layers=True, remat=True)
    scan_model = dataclasses.replace(
        model, backbone_config=dataclasses.replace(model.backbone_config, text=text),
        decoder_config=dataclasses.replace(model.decoder_config, scan_layers=True, remat=True))
    return scan_model, {**params, "backbone": qwen3_vl_params.to_layout(params["backbone"], True),
                        "decoder": qwen3_params.to_layout(params["decoder"], True)}


def loop_layout(params):
    from vital_jax.models.qwen3 import params as qwen3_params
    from vital_jax.models.qwen3_vl import params as qwen3_vl_params

    return {**params, "backbone": qwen3_vl_params.to_layout(params["backbone"], False),
            "decoder": qwen3_params.to_layout(params["decoder"], False)}


def tiny_data(model, seed=0, pad_patches_to=64) -> dict:
    """The pipeline's numpy batch contract for 8 examples (left-padded prompts, packed patches)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    b = len(GRIDS)
    rows = []
    for i, (t, h, w) in enumerate(GRIDS):
        # Row 0's prompt is the longest, so a process without it has a shorter local Tp.
        rows.append(list(rng.randint(0, 56, 2 + i % 3 + (8 if i == 0 else 0))) + [VS] + [IMG] * (t * h * w // 4) + [VE]
                    + list(rng.randint(0, 56, 3 + (2 * i) % 5)))
    tp = max(len(r) for r in rows)
    prompt_ids = np.zeros((b, tp), np.int32)
    prompt_valid = np.zeros((b, tp), bool)
    for i, r in enumerate(rows):
        prompt_ids[i, tp - len(r):], prompt_valid[i, tp - len(r):] = r, True
    ta, ts, k_max = 5, 4, model.config.k_max
    answer_ids = rng.randint(0, 56, (b, ta)).astype(np.int32)
    answer_valid = np.zeros((b, ta), bool)
    for i in range(b):
        n = 2 + i % 3
        answer_ids[i, n] = IM_END
        answer_valid[i, :n + 1] = True
    step_ids = rng.randint(0, 56, (b, k_max, ts)).astype(np.int32)
    step_valid = np.zeros((b, k_max, ts), bool)
    for i, k in enumerate(LATENT_STEPS):
        for s in range(k):
            step_valid[i, s, :2 + (i + s) % 3] = True
    n_patches = sum(t * h * w for t, h, w in GRIDS)
    patches = np.zeros((max(pad_patches_to or 0, n_patches), model.backbone_config.vision.patch_dim), np.float32)
    patches[:n_patches] = rng.randn(n_patches, patches.shape[1])
    roi = rng.randn(b, model.config.roi_dim).astype(np.float32)
    roi /= np.linalg.norm(roi, axis=1, keepdims=True)
    return dict(prompt_ids=prompt_ids, prompt_valid=prompt_valid, pixel_patches=patches,
                image_grid_thw=np.asarray(GRIDS, np.int32), answer_ids=answer_ids, answer_valid=answer_valid,
                latent_steps=np.asarray(LATENT_STEPS, np.int32), step_ids=step_ids, step_valid=step_valid,
                roi_feature=roi, example_valid=np.ones((b,), bool))


def select_rows(data: dict, rows, pad_patches_to: int | None = None) -> dict:
    """A process's share of the global batch: its example rows, their patches re-packed (padded to
    `pad_patches_to`), all-padding prompt columns dropped (so processes see different local shapes)."""
    import numpy as np

    rows = list(rows)
    sizes = [int(np.prod(g)) for g in data["image_grid_thw"]]
    starts = np.cumsum([0] + sizes)
    out = {k: v[rows] for k, v in data.items() if k not in ("pixel_patches", "image_grid_thw")}
    patches = np.concatenate([data["pixel_patches"][starts[r]:starts[r + 1]] for r in rows])
    if pad_patches_to:
        patches = np.concatenate([patches, np.zeros((pad_patches_to - len(patches), patches.shape[1]),
                                                    patches.dtype)])
    out["pixel_patches"] = patches
    out["image_grid_thw"] = data["image_grid_thw"][rows]
    keep = out["prompt_valid"].any(axis=0)
    out["prompt_ids"], out["prompt_valid"] = out["prompt_ids"][:, keep], out["prompt_valid"][:, keep]
    return out


def make_step(model):
    """(optimizer, state, frozen, step_fn) for `vital_jax.vital.train_step.train_step`.

    The optimizer is clipped SGD with momentum, not the recipe's AdamW: Adam's first update is
    lr * g / (|g| + eps), which turns rounding noise in a gradient that cancels to zero (e.g. the visual
    projector's output-LayerNorm bias under the L1 loss, a sum of +-1/N signs) into a parameter move of up to lr,
    so Adam-updated parameters cannot be compared at a reduction-order tolerance. With SGD the update is linear in
    the gradient and a 1e-5 relative tolerance on parameters measures the sharded gradients themselves.
    """
    import functools

    import optax

    from vital_jax.vital.train_step import init_train_state, train_step

    def setup(params):
        import jax

        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
        state, frozen = init_train_state(params, optimizer, jax.random.PRNGKey(7))
        return optimizer, state, frozen, functools.partial(train_step, model, optimizer)

    return setup


def flat(tree) -> dict:
    import jax
    import numpy as np

    from vital_jax import sharding
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {sharding.path_str(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def checksum(tree) -> float:
    import numpy as np
    return float(sum(np.abs(v.astype(np.float64)).sum() for v in flat(tree).values()))


def compare(a: dict, b: dict) -> dict:
    """Largest abs difference and largest difference relative to the leaf's max magnitude."""
    import numpy as np
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for k in a:
        diff = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0
        rel = diff / max(float(np.max(np.abs(b[k]))) if b[k].size else 0.0, 1e-30)
        worst_abs = max(worst_abs, diff)
        if rel > worst_rel:
            worst_rel, worst = rel, k
    return {"max_abs": worst_abs, "max_rel": worst_rel, "worst_leaf": worst, "leaves": len(a),
            "same_keys": sorted(a) == sorted(b)}


# ------------------------------------------------------------------------------------------------------ modes
SPEC_PATHS = (
    "params/backbone/language_model/model/layers_0/self_attn/q_proj/lora_a",
    "params/backbone/language_model/model/layers_0/self_attn/q_proj/lora_b",
    "params/backbone/language_model/model/layers_0/self_attn/o_proj/lora_b",
    "params/decoder/model/layers_0/self_attn/q_proj/kernel",
    "params/decoder/model/layers_0/self_attn/o_proj/kernel",
    "params/decoder/model/layers_0/mlp/down_proj/kernel",
    "params/decoder/embed_tokens/embedding",
    "params/decoder/model/norm/scale",
    "params/visual_projector/fc2/kernel",
    "opt_state/1/0/trace/decoder/model/layers_0/self_attn/q_proj/kernel",
    "frozen/backbone/language_model/model/layers_0/self_attn/q_proj/kernel",
    "frozen/backbone/language_model/embed_tokens/embedding",
    "frozen/backbone/visual/blocks_0/attn/qkv/kernel",
    "frozen/backbone/lm_head/kernel",
    "batch/prefix/input_ids",
    "batch/prefix/positions",
    "batch/prefix/pixel_patches",
    "batch/answer_ids",
)


def run_meshes(args) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding

    from vital_jax import distributed, sharding
    from vital_jax.vital.batch import from_numpy

    jax.config.update("jax_default_matmul_precision", "highest")
    model = tiny_model()
    params = tiny_params(model)
    data = tiny_data(model)
    optimizer, state, frozen, step_fn = make_step(model)(params)
    batch = from_numpy(data, model.backbone_config)

    # Lower the one-device reference and every mesh, compiling each (two at a time) while the next one lowers: XLA's
    # CPU compiler is single-threaded per program and compiling dominates this run.
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [("reference", None, None, pool.submit(jax.jit(step_fn).lower(state, frozen, batch).compile))]
        for shape in [tuple(int(v) for v in m.split(",")) for m in args.meshes]:
            mesh = sharding.make_mesh(shape)
            state_sh, state_report = sharding.tree_shardings(state, mesh)
            frozen_sh, frozen_report = sharding.tree_shardings(frozen, mesh)
            # The batch as training builds it: each batch shard's patches packed into its own slice.
            mesh_batch = distributed.global_vital_batch(data, model.backbone_config, mesh)
            batch_sh, batch_report = sharding.batch_shardings(mesh_batch, mesh)
            placed = (sharding.shard(state, state_sh), sharding.shard(frozen, frozen_sh),
                      sharding.shard(mesh_batch, batch_sh))
            with jax.set_mesh(mesh):
                lowered = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                                  out_shardings=(state_sh, None)).lower(*placed)
            reports = {name: {"fallbacks": r.fallbacks, "unmatched": r.unmatched}
                       for name, r in (("state", state_report), ("frozen", frozen_report), ("batch", batch_report))}
            jobs.append((shape, (mesh, state_sh, placed), reports, pool.submit(lowered.compile)))
        num_meshes = len(jobs) - 1
        # The scan layout of the 8B recipe (`scan_layers`, stacked parameters) on the FSDP x tensor mesh.
        scan_model, scan_params = scan_layout(model, params)
        _, scan_state, scan_frozen, scan_step_fn = make_step(scan_model)(scan_params)
        scan_mesh = sharding.make_mesh((2, 2, 2))
        scan_sh = [sharding.tree_shardings(tree, scan_mesh)[0] for tree in (scan_state, scan_frozen)]
        scan_batch = distributed.global_vital_batch(data, model.backbone_config, scan_mesh)
        scan_sh.append(sharding.batch_shardings(scan_batch, scan_mesh)[0])
        scan_placed = tuple(sharding.shard(x, sh) for x, sh in zip((scan_state, scan_frozen, scan_batch), scan_sh))
        with jax.set_mesh(scan_mesh):
            scan_lowered = jax.jit(scan_step_fn, in_shardings=tuple(scan_sh),
                                   out_shardings=(scan_sh[0], None)).lower(*scan_placed)
        jobs.append(("scan", (scan_mesh, scan_sh[0], scan_placed), None, pool.submit(scan_lowered.compile)))
        compiled = [job[3].result() for job in jobs]
    compile_seconds = time.time() - t0

    ref_state, ref_metrics = compiled[0](state, frozen, batch)
    ref_params, ref_opt = flat(ref_state.params), flat(ref_state.opt_state)
    _emit("reference", loss=float(ref_metrics["loss"]), grad_norm=float(ref_metrics["grad_norm"]),
          compile_seconds=compile_seconds, devices=jax.device_count())

    with jax.set_mesh(scan_mesh):
        scan_new, scan_metrics = compiled[-1](*scan_placed)
    q = scan_new.params["backbone"]["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    _emit("scan_mesh", mesh=[2, 2, 2], loss=float(scan_metrics["loss"]), grad_norm=float(scan_metrics["grad_norm"]),
          params=compare(flat(loop_layout(scan_new.params)), ref_params),
          lora_b_spec=[list(a) if isinstance(a, tuple) else a for a in q.sharding.spec])

    saved = None
    for (shape, (mesh, state_sh, placed), reports, _), step in zip(jobs[1:num_meshes + 1],
                                                                   compiled[1:num_meshes + 1]):
        with jax.set_mesh(mesh):
            new_state, metrics = step(*placed)
        specs = {}
        for prefix, tree in (("params", new_state.params), ("opt_state", new_state.opt_state),
                             ("frozen", placed[1]), ("batch", placed[2])):
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                name = f"{prefix}/{sharding.path_str(p)}"
                if name in SPEC_PATHS:
                    specs[name] = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
        out_of_mesh = [sharding.path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(new_state.params)[0]
                       if not (isinstance(x.sharding, NamedSharding) and x.sharding.mesh.shape == mesh.shape)]
        mem = max(sum(s.data.nbytes for x in jax.tree.leaves(new_state.params) for s in x.addressable_shards
                      if s.device == d) for d in mesh.devices.flat)
        _emit("packing", mesh=list(shape), **packing_facts(placed[2], data, model))
        _emit("mesh", mesh=list(shape), loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
              params=compare(flat(new_state.params), ref_params), opt_state=compare(flat(new_state.opt_state), ref_opt),
              specs=specs, out_of_mesh=out_of_mesh, max_param_bytes_per_device=int(mem),
              total_param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(new_state.params))), report=reports)

        if shape == (2, 2, 2):
            # An activation constraint inside jit, as the models would apply it at a layer boundary.
            x = np.zeros((8, 3, 4, 5), np.float32)
            with jax.set_mesh(mesh):
                y = jax.jit(lambda v: sharding.constrain(v + 1, ("batch", "length", "act_heads", "head_dim")))(x)
            _emit("constrain", spec=[list(a) if isinstance(a, tuple) else a for a in y.sharding.spec],
                  shard_shape=list(y.addressable_shards[0].data.shape))

            _emit("fsdp_tensor_matmul", **fsdp_tensor_matmul(mesh))

        if args.ckpt:
            checkpointer = ocp.StandardCheckpointer()
            if saved is None:
                path = os.path.join(os.path.abspath(args.ckpt), "state")
                checkpointer.save(path, new_state)
                checkpointer.wait_until_finished()
                saved = (path, flat(new_state), shape)
            else:
                target = sharding.abstract_with_shardings(new_state, state_sh)
                restored = checkpointer.restore(saved[0], target)
                restored_flat = flat(restored)
                equal = sorted(restored_flat) == sorted(saved[1]) and all(
                    np.array_equal(restored_flat[k], saved[1][k]) for k in saved[1])
                on_mesh = all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state_sh)))
                q = restored.params["decoder"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
                _emit("restore", saved_on=list(saved[2]), restored_on=list(shape), equal=bool(equal),
                      on_target_shardings=bool(on_mesh), leaves=len(restored_flat),
                      q_proj_spec=[list(a) if isinstance(a, tuple) else a for a in q.sharding.spec],
                      q_proj_shard_shape=list(q.addressable_shards[0].data.shape))


def packing_facts(batch, data, model) -> dict:
    """Where `distributed.global_vital_batch` put each example's patches: for every device, whether its slice of
    the packed patches holds exactly the patches of the examples in its batch rows (then zero padding), and
    whether those examples' image tokens index merged rows inside that slice; plus whether attention segments
    are unique across slices."""
    import numpy as np

    merge = model.backbone_config.vision.merge_unit
    sizes = [int(np.prod(g)) for g in data["image_grid_thw"]]
    starts = np.cumsum([0] + sizes)
    index = np.asarray(batch.prefix.image_feature_index)
    image_tokens = (np.asarray(batch.prefix.input_ids) == IMG) & np.asarray(batch.prefix.token_valid)
    local, indexed = True, True
    for patch_shard in batch.prefix.pixel_patches.addressable_shards:
        rows = patch_shard.index[0].indices(batch.prefix.pixel_patches.shape[0])
        examples = [s.index[0] for s in batch.prefix.input_ids.addressable_shards if s.device == patch_shard.device]
        members = range(*examples[0].indices(index.shape[0]))
        expected = np.concatenate([data["pixel_patches"][starts[i]:starts[i + 1]] for i in members])
        got = np.asarray(patch_shard.data)
        local &= bool(np.array_equal(got[:len(expected)], expected) and not got[len(expected):].any())
        lo, hi = rows[0] // merge, rows[1] // merge
        indexed &= all(lo <= int(r) < hi for i in members for r in index[i][image_tokens[i]])
    by_rows = {}  # slices replicated over "tensor" appear once per device: key them by their rows
    segment_ids = batch.prefix.vision_inputs.segment_ids
    for shard in segment_ids.addressable_shards:
        by_rows[shard.index[0].indices(segment_ids.shape[0])[:2]] = set(np.asarray(shard.data).tolist()) - {0}
    segments_by_slice = list(by_rows.values())
    unique = all(not (a & b) for i, a in enumerate(segments_by_slice) for b in segments_by_slice[i + 1:])
    return {"patches_local": local, "index_local": indexed, "segments_unique": unique,
            "slices": len(segments_by_slice), "packed_rows": int(batch.prefix.pixel_patches.shape[0])}


def fsdp_tensor_matmul(mesh) -> dict:
    """The partitioning hazard `sharding.constrain_weight` guards against, on the (2, 2, 2) mesh: an o_proj-like
    `tanh(x) @ W` with x's batch over data x fsdp, W split (tensor, fsdp) and the output asked for over
    (batch, -, tensor). Returns the largest error of the raw `jnp.dot` (XLA's choice; jax 0.10.2 swaps the batch
    shards of devices (0,1,t) and (1,0,t)) and of our `Linear`, each against the unsharded result."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from vital_jax import sharding
    from vital_jax.layers.linear import Linear

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Linear(32, name="o_proj")(jnp.tanh(x))

    rng = np.random.RandomState(5)
    x = rng.randn(8, 1, 32).astype(np.float32)
    kernel = rng.randn(32, 32).astype(np.float32)
    expected = np.tanh(x.astype(np.float64)) @ kernel
    out_axes = ("batch", "length", "act_mlp")
    x_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    w_sh = NamedSharding(mesh, sharding.spec_for(sharding.param_logical_axes("o_proj/kernel", kernel.shape),
                                                 kernel.shape, mesh)[0])
    with jax.set_mesh(mesh):
        raw = jax.jit(lambda x, w: sharding.constrain(jnp.dot(jnp.tanh(x), w), out_axes))(
            jax.device_put(x, x_sh), jax.device_put(kernel, w_sh))
        linear = jax.jit(lambda x, w: sharding.constrain(Block().apply({"params": {"o_proj": {"kernel": w}}}, x),
                                                         out_axes))(
            jax.device_put(x, x_sh), jax.device_put(kernel, w_sh))
    return {"kernel_spec": [list(a) if isinstance(a, tuple) else a for a in w_sh.spec],
            "raw_dot_max_abs": float(np.max(np.abs(np.asarray(raw) - expected))),
            "linear_max_abs": float(np.max(np.abs(np.asarray(linear) - expected)))}


def logged_work(model, batch, samples: int) -> dict:
    """What the trainer logs of a step's work (`train.step_work`) for the global `batch`."""
    from vital_jax.train import step_work
    from vital_jax.vital import accounting

    tokens, flops = step_work(model, accounting.account(model), batch, samples, model.config.k_max)
    return dict(samples=samples, tokens=tokens, flops=flops)


def run_reference(args) -> None:
    import jax

    from vital_jax.vital.batch import from_numpy

    jax.config.update("jax_default_matmul_precision", "highest")
    model = tiny_model()
    _, state, frozen, step_fn = make_step(model)(tiny_params(model))
    batch = from_numpy(tiny_data(model), model.backbone_config)
    step = jax.jit(step_fn)
    losses = []
    for _ in range(args.steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    _emit("result", process_id=0, num_processes=1, losses=losses, checksum=checksum(state.params),
          devices=jax.device_count(), logged_work=logged_work(model, batch, 8))


def run_process(args) -> None:
    import jax

    from vital_jax import distributed, sharding

    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                             initialization_timeout=60)
    mesh = sharding.make_mesh(tuple(int(v) for v in args.mesh.split(",")))
    model = tiny_model()
    _, state, frozen, step_fn = make_step(model)(tiny_params(model))
    data = tiny_data(model)
    global_b = len(GRIDS)
    batch_spec, _ = sharding.spec_for(("batch",), (global_b,), mesh)
    rows = distributed.process_rows(jax.sharding.NamedSharding(mesh, batch_spec), (global_b,))
    # Each process gets its own patch bucket (different local Np) and drops its own padding columns.
    local = select_rows(data, rows, pad_patches_to=40 + 8 * jax.process_index())
    batch = distributed.global_vital_batch(local, model.backbone_config, mesh)

    state_sh, _ = sharding.tree_shardings(state, mesh)
    frozen_sh, _ = sharding.tree_shardings(frozen, mesh)
    batch_sh, _ = sharding.batch_shardings(batch, mesh)
    # Parameters are identical on every process (same seed): each process supplies its devices' slices.
    to_global = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: distributed.global_from_host_copy(jax.device_get(x), s), tree, sh)
    state, frozen = to_global(state, state_sh), to_global(frozen, frozen_sh)
    with jax.set_mesh(mesh):
        step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None))
        losses = []
        for _ in range(args.steps):
            state, metrics = step(state, frozen, batch)
            losses.append(float(metrics["loss"]))
        # Gather the sharded parameters so every process can checksum the full tree.
        replicated = jax.jit(lambda t: t, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                             )(state.params)
    _emit("result", process_id=jax.process_index(), num_processes=jax.process_count(), losses=losses,
          checksum=checksum(replicated), rows=[int(r) for r in rows],
          local_prompt_len=int(local["prompt_ids"].shape[1]),
          global_prompt_len=int(batch.prefix.input_ids.shape[1]), devices=jax.device_count(),
          local_devices=jax.local_device_count(), primary=distributed.is_primary(),
          logged_work=logged_work(model, batch, distributed.process_sum(local["example_valid"].sum())),
          mesh_checks=mesh_checks())
    jax.distributed.shutdown()


def mesh_checks() -> dict:
    """`train.check_mesh` on meshes of this run's processes: {mesh shape: None (accepted) or the error}."""
    from configs import base
    from vital_jax import train

    config = base.get_config()
    config.data.batch_size = 2
    out = {}
    for shape in ((-1, 1, 1), (2, 1, 2), (1, 1, 4)):
        config.mesh.shape = shape
        try:
            train.check_mesh(config)
            out[str(shape)] = None
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the type it expects
            out[str(shape)] = f"{type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------------- MedSynapse-V Stage II (GRPO)
GRPO_FEATURES = (3, 4, 16)  # Hf, Wf, df of the stored E_ana feature maps


def grpo_setup():
    """(backbone module with LoRA, sampler, params {"sampler", "backbone"}, GRPO config, optimizer, the global
    batch's numpy rows (pipeline batch + stored F and regions), accuracy_fn) for a 2-step Stage II run."""
    import jax
    import numpy as np

    from vital_jax.medsynapse import grpo
    from vital_jax.medsynapse import reward as reward_lib
    from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig

    model = tiny_model()
    params = tiny_params(model)
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=model.backbone_config.text.hidden_size,
                                                    num_queries=3, num_heads=4, output_rms=0.5))
    rng = np.random.RandomState(11)
    b = len(GRIDS)
    data = tiny_data(model)
    data["feature_map"] = rng.randn(b, *GRPO_FEATURES).astype(np.float32)
    regions = np.zeros((b, 2, *GRPO_FEATURES[:2]), bool)
    regions[:, 0, :2, :2], regions[:, 1, :, 3] = True, True
    data["region_masks"], data["region_valid"] = regions, np.ones((b, 2), bool)
    data["region_confidence"] = rng.rand(b, 2).astype(np.float32)
    sampler_params = jax.jit(sampler.init)(jax.random.PRNGKey(3), data["feature_map"][:1])["params"]
    config = grpo.GRPOConfig(num_generations=2, max_new_tokens=3, eos_token_ids=(IM_END,), pad_token_id=0,
                             reward=reward_lib.RewardConfig(lambda_causal=0.5))

    def accuracy(tokens, lengths):  # a reward every process can compute from its own rows alone
        return ((tokens[:, 0] % 3 == 0) | (lengths == 1)).astype(np.float32)

    return (model.backbone, sampler, {"sampler": sampler_params, "backbone": params["backbone"]}, config,
            grpo.make_optimizer(1e-2), data, accuracy)


def _grpo_run(mesh, rows, steps):
    import jax
    import numpy as np

    from vital_jax import distributed, sharding
    from vital_jax.medsynapse import grpo

    backbone, sampler, params, config, optimizer, data, accuracy = grpo_setup()
    state, frozen = grpo.init_train_state(params, optimizer, jax.random.PRNGKey(7))
    local = select_rows(data, rows, pad_patches_to=None)
    for key in ("feature_map", "region_masks", "region_valid", "region_confidence"):
        local[key] = data[key][list(rows)]
    vb = distributed.global_vital_batch(local, backbone.config, mesh)
    batch = grpo.PromptBatch(prefix=vb.prefix, example_valid=vb.example_valid,
                             **{k: distributed.global_per_example(local[k], mesh)
                                for k in ("feature_map", "region_masks", "region_confidence", "region_valid")})
    to_global = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: distributed.global_from_host_copy(jax.device_get(x), s), tree,
        sharding.tree_shardings(tree, mesh)[0])
    state, frozen = to_global(state), to_global(frozen)
    step = grpo.make_grpo_step(backbone, sampler, config, optimizer)
    history = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, metrics = step(state, frozen, batch, accuracy)
            history.append({k: metrics[k] for k in ("reward_mean", "r_acc", "r_causal", "loss", "grad_norm")})
        replicated = jax.jit(lambda t: t, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                             )(state.params)
    # `distributed.host_copy` (what `medsynapse.trainer.mean_teacher_memory` reads P_phi with) on P_phi's
    # parameters laid out over the mesh's data axis, i.e. across the two processes where there are two.
    data_axis = lambda x: jax.sharding.NamedSharding(  # noqa: E731
        mesh, jax.sharding.PartitionSpec("data") if x.ndim and x.shape[0] % 2 == 0 else jax.sharding.PartitionSpec())
    across = jax.tree.map(lambda x: distributed.global_from_host_copy(np.asarray(x), data_axis(x)),
                          jax.device_get(frozen["sampler"]))
    host = distributed.host_copy(across)
    gathered = sum(not x.is_fully_addressable for x in jax.tree.leaves(across))
    return history, checksum(replicated), {"checksum": checksum(host), "gathered_leaves": int(gathered),
                                           "numpy": all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))}


def run_grpo(args) -> None:
    """Stage II (GRPO) steps: one process on one device (--num_processes unset) or this process's share of the
    global batch on a multi-process mesh; every process prints its metrics, the adapters' checksum and that of
    its `distributed.host_copy` of P_phi."""
    import jax

    from vital_jax import distributed, sharding

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.num_processes:
        distributed.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                                 initialization_timeout=60)
        mesh = sharding.make_mesh(tuple(int(v) for v in args.mesh.split(",")))
    else:
        mesh = sharding.make_mesh((1, 1, 1))
    global_b = len(GRIDS)
    batch_spec, _ = sharding.spec_for(("batch",), (global_b,), mesh)
    rows = distributed.process_rows(jax.sharding.NamedSharding(mesh, batch_spec), (global_b,))
    history, total, host_copy = _grpo_run(mesh, rows, args.steps)
    _emit("result", process_id=jax.process_index(), num_processes=jax.process_count(), history=history,
          checksum=total, rows=[int(r) for r in rows], devices=jax.device_count(), host_copy=host_copy)
    if args.num_processes:
        jax.distributed.shutdown()

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("meshes", "reference", "process", "grpo"))
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
    parser.add_argument("--meshes", nargs="*", default=["8,1,1", "2,4,1", "2,2,2"])
    parser.add_argument("--ckpt", default="")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--coordinator")
    parser.add_argument("--mesh", default="2,2,1")
    args = parser.parse_args(argv)
    # A worker that is still running after 150 s writes every thread's Python stack to its log (and again every
    # 150 s), so a hang inside the suite shows where it waits.
    faulthandler.dump_traceback_later(150, repeat=True)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _setup_env(args.devices)
    {"meshes": run_meshes, "reference": run_reference, "process": run_process, "grpo": run_grpo}[args.mode](args)


if __name__ == "__main__":
    main()
