"""Train VITAL: `python -m vital_jax.train --config=configs/<name>.py --workdir=DIR [--config.FIELD=VALUE ...]`.

A config with `method = "medsynapse"` (configs/medsynapse_*.py) runs MedSynapse-V's three stages instead
(`vital_jax/medsynapse/trainer.py`: a checkpoint folder per stage, the same resume, SIGTERM and error handling).

The 3-phase curriculum (paper §3.5): phase n trains on the records with K <= curriculum.max_k[n] for
curriculum.epochs[n] epochs, warm-starting from phase n-1, and checkpoints into `workdir/phase_<n>/` (trainable
params, optimizer state, step, RNG and the grain iterator state). Rerunning the same command resumes from the
latest checkpoint with the same data order (an unreadable checkpoint is moved aside and the one before it used;
metrics logged after the checkpoint are moved to metrics.rewound.jsonl); SIGTERM saves and exits cleanly; a
non-finite loss stops the run naming the step, the batch's record ids and the checkpoint a rerun resumes from
(which may hold the diverged parameters). One run at a time uses a workdir, and its config is recorded there once the
first step has run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from ml_collections import config_flags

from vital_jax import cli
from vital_jax import checkpoint as ckpt_lib
from vital_jax import demo, distributed, sharding
from vital_jax import workdir as workdir_lib
from vital_jax.batch_ahead import BatchAhead
from vital_jax.cli import NonFiniteLossError
from vital_jax.jsonio import atomic_write
from vital_jax.models.hf_config import ConfigError
from vital_jax.observability import MetricsLogger, peak_flops_per_device
from vital_jax.run import build_model, load_run, resolve_paths
from vital_jax.vital import accounting, trainable
from vital_jax.vital.batch import VitalBatch, check_token_ids, latent_slots, slice_latent_slots
from vital_jax.vital.model import VitalModel
from vital_jax.vital.train_step import init_train_state, train_step

_CONFIG = None
_WORKDIR = None


def _define_flags():
    """Flags exist only when this module runs as a program (importing it, as the study does, defines none)."""
    global _CONFIG, _WORKDIR
    _CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the resolved config go")


def step_work(model: VitalModel, flops_account, batch: VitalBatch, samples: int, slots: int
              ) -> tuple[int, float | None]:
    """(tokens, model FLOPs) of one train step for the logged throughput and MFU, from the global `batch` (the
    shapes the step computes on: every process's prompts left-padded to the longest of all, each batch shard's
    patch slice) and `samples`, the valid examples of all processes. Tokens: prompt, latent slots and answer of
    each valid example. FLOPs: None without `flops_account` (no peak to compare with)."""
    tokens = samples * (batch.prefix.input_ids.shape[1] + slots + batch.answer_ids.shape[1])
    if flops_account is None:
        return tokens, None
    patches = 0 if batch.prefix.pixel_patches is None else batch.prefix.pixel_patches.shape[0]
    flops = accounting.train_step_flops(model, flops_account, batch.prefix.input_ids.shape[0],
                                        batch.prefix.input_ids.shape[1], patches, batch.answer_ids.shape[1],
                                        batch.step_ids.shape[2], latent_slots=slots)
    return tokens, flops


def peak_flops(config) -> float | None:
    """Aggregate bf16 peak FLOP/s of all devices for `perf/mfu`: `config.logging.peak_tflops_per_device` or,
    when 0, the datasheet peak of the device kind; None (no MFU logged) for CPUs and unlisted chips."""
    per_device = float(config.logging.peak_tflops_per_device) * 1e12
    if per_device <= 0:
        per_device = peak_flops_per_device(jax.devices()[0].device_kind) or 0.0
    return per_device * jax.device_count() if per_device > 0 else None


def pipeline_config(config):
    from vital_jax.data.pipeline import PipelineConfig

    d = config.data
    return PipelineConfig(batch_size=d.batch_size, prompt_buckets=tuple(d.prompt_buckets),
                          max_answer_tokens=d.max_answer_tokens, max_step_tokens=d.max_step_tokens,
                          k_max_slots=config.vital.k_max, max_pixels=d.max_pixels, min_pixels=d.min_pixels,
                          num_workers=d.num_workers,
                          # Appendix C.5's per-step targets interpolate from each image's f_global.
                          global_feature=config.vital.visual_target == "interpolated",
                          blind_images=config.data.blind_images)


def min_k(config) -> tuple[int, ...]:
    """Each phase's lower K bound (1 unless curriculum.min_k says otherwise)."""
    return tuple(config.curriculum.min_k) or (1,) * len(config.curriculum.max_k)


def phase_steps(config, data_dir: str, capped: bool = True) -> list[int]:
    """Optimizer steps of each phase: epochs x (this process's records with min_k <= K <= max_k) // batch size,
    cut (capped=True) so that their total is at most curriculum.max_steps (0: no cap); phases beyond the cap get 0."""
    from vital_jax.data.pipeline import select_records

    steps = []
    for max_k, epochs, low in zip(config.curriculum.max_k, config.curriculum.epochs, min_k(config)):
        n = len(select_records(data_dir, config.data.train_split, max_k, low)) // jax.process_count()
        steps.append(int(epochs) * (n // config.data.batch_size))
    budget = int(config.curriculum.get("max_steps", 0))
    if capped and budget > 0:
        out = []
        for n in steps:
            out.append(min(n, budget))
            budget -= out[-1]
        steps = out
    return steps


def validate_config(config) -> None:
    """Every impossible value is a ConfigError before anything runs (not, say, a division by a zero batch size
    once the data has been read)."""
    if config.get("method", "vital") != "vital":
        raise ConfigError(f"config.method={config.method!r}: VITAL's trainer trains method 'vital' (a MedSynapse-V "
                          "config runs through `python -m vital_jax.train`, which dispatches on the method)")
    c = config.curriculum
    if len(c.max_k) != len(c.epochs) or not c.max_k:
        raise ConfigError(f"config.curriculum: max_k {tuple(c.max_k)} and epochs {tuple(c.epochs)} must be "
                          "non-empty and of equal length")
    if any(k < 1 or k > config.vital.k_max for k in c.max_k):
        raise ConfigError(f"config.curriculum.max_k {tuple(c.max_k)} must lie in 1..vital.k_max={config.vital.k_max}")
    if c.min_k and (len(c.min_k) != len(c.max_k) or any(lo < 1 or lo > hi for lo, hi in zip(c.min_k, c.max_k))):
        raise ConfigError(f"config.curriculum.min_k {tuple(c.min_k)} must be empty or give 1 <= min_k <= max_k "
                          f"for each of the {len(c.max_k)} phases")
    if any(e < 1 for e in c.epochs):
        raise ConfigError(f"config.curriculum.epochs {tuple(c.epochs)} must each be >= 1")
    if c.get("max_steps", 0) < 0:
        raise ConfigError(f"config.curriculum.max_steps={c.max_steps} must be >= 0 (0 = every epoch)")
    workdir_lib.check_run_fields(config, {"vital.k_max": config.vital.k_max})
    if config.vital.lora_rank < 0:
        raise ConfigError(f"config.vital.lora_rank={config.vital.lora_rank} must be >= 0")
    if config.logging.probe_every_steps < 0:
        raise ConfigError("config.logging.probe_every_steps must be >= 0 (0 = no probe)")
    if not 0.0 <= config.optimizer.warmup_ratio <= 1.0:
        raise ConfigError(f"config.optimizer.warmup_ratio={config.optimizer.warmup_ratio} must lie in [0, 1]")
    if config.optimizer.schedule_scope not in trainable.SCHEDULE_SCOPES:
        raise ConfigError(f"config.optimizer.schedule_scope={config.optimizer.schedule_scope!r} must be one of "
                          f"{trainable.SCHEDULE_SCOPES}")
    from vital_jax.data.pipeline import PipelineError

    try:
        pipeline_config(config)
    except PipelineError as e:
        raise ConfigError(f"config.data: {e}") from e


def batch_sizes(config) -> dict[str, int]:
    """{config field: records per process in one step} of VITAL's training: what must split over the mesh's batch
    axes (`check_mesh`) and what a resume on another number of processes keeps the product of
    (`workdir_lib.check_global_batch`). MedSynapse-V's stages: `medsynapse.trainer.stage_batches`."""
    return {"data.batch_size": int(config.data.batch_size)}


def check_mesh(config, batches: Mapping[str, int] | None = None) -> None:
    """`config.mesh.shape` against the devices of all processes, and each global batch (a per-process batch x
    processes) against the mesh's batch axes (data x fsdp): a ConfigError naming the value to set, before any
    model is loaded. batches: {config field: its per-process batch size}, by default `batch_sizes(config)`
    (MedSynapse-V's stages: `medsynapse.trainer.stage_batches`). Call it after
    `distributed.maybe_initialize_distributed` (it counts every process's devices)."""
    devices = jax.device_count()
    shape = tuple(config.mesh.shape)
    try:
        data, fsdp, _ = sharding.MeshConfig.from_config(config).resolve(devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh.shape={shape}: {e}; set --config.mesh.shape to three positive integers "
                          f"(data, fsdp, tensor) whose product is {devices}, one of them may be -1 for the remaining "
                          f"devices, e.g. '(-1, 1, 1)'") from None
    processes = jax.process_count()
    batches = batches if batches is not None else batch_sizes(config)
    for field, size in batches.items():
        if size * processes % (data * fsdp):
            raise ConfigError(f"config.{field}={size} x {processes} process(es) = {size * processes} examples per "
                              f"step do not split over the mesh's data x fsdp = {data} x {fsdp} = {data * fsdp} "
                              f"batch shards (config.mesh.shape={shape}): set {field} to a multiple of "
                              f"{data * fsdp // math.gcd(data * fsdp, processes)} or change the mesh")
    if processes > 1:
        _check_process_rows(config, batches)


def _check_process_rows(config, batches: Mapping[str, int]) -> None:
    """Each process must hold the batch rows of its own examples and no other process's: a mesh axis the batch is
    not split over (tensor) that spans devices of several processes puts one batch shard on two processes, and
    jax refuses the batch at the first step, after the model has loaded."""
    mesh = sharding.mesh_from_config(config)
    for field, size in batches.items():
        shape = (size * jax.process_count(),)
        spec, _ = sharding.spec_for(("batch",), shape, mesh)
        held = len(distributed.process_rows(NamedSharding(mesh, spec), shape))
        if held != size:
            raise ConfigError(
                f"config.mesh.shape={tuple(config.mesh.shape)} (data, fsdp, tensor = "
                f"{tuple(mesh.shape.values())}) places {held} of the {shape[0]} examples per step on this "
                f"process's {jax.local_device_count()} device(s), which read {size} (config.{field}): an axis the "
                "batch is not split over (tensor) spans several processes; keep tensor within one process's "
                f"devices (at most {jax.local_device_count()}), or run fewer processes with more devices each")


def prepare_demo(workdir: str, demo_config) -> None:
    """`demo.prepare` on process 0 while the other processes wait: they all read the same workdir, and two
    builders writing the same files at once leave a broken dataset (every record twice)."""
    from vital_jax.run import DEMO_DIR, DEMO_READY_FILE, SHIPPED

    ready = os.path.exists(os.path.join(workdir, DEMO_DIR, DEMO_READY_FILE))
    if jax.process_count() > 1 and demo_config.pretrain != SHIPPED and not ready:
        raise ConfigError(f"config.demo.pretrain={demo_config.pretrain!r}: the demo pretrains its backbone in one "
                          "process only; build the assets with one process first (the same command without the "
                          "launcher; they are reused) or set config.demo.pretrain='shipped'")
    distributed.on_primary(lambda: demo.prepare(workdir, demo_config), f"build the demo's assets in {workdir}")


def finish_demo(workdir: str) -> None:
    """`demo.finish` (evaluation, explanation, HF export) on process 0 while the other processes wait: run by every
    process, the work was done once per process and they all wrote eval/ and export_hf/ at once.

    Every process loads the run first (orbax's restore has barriers), each a whole copy on its own device
    (`checkpoint.restore_saved_state`). Process 0 then works on its own device alone. The others wait for it at a
    barrier rather than exit: one that exits first waits in jax's distributed shutdown for process 0 and times
    out, and the run would look done before its artefacts are. The barrier carries process 0's outcome, so a
    failed finish fails all (`distributed.on_primary`)."""
    if jax.process_count() == 1:
        demo.finish(workdir)
        return
    cli.status("demo: loading the trained run for evaluation...")
    run = load_run(workdir)
    if not distributed.is_primary():
        print(f"demo: process 0 writes the artefacts (evaluation, explanation, HF export) in {workdir}; process "
              f"{jax.process_index()} waits for it", file=sys.stderr, flush=True)
    distributed.on_primary(lambda: demo.finish(workdir, run=run), f"finish the demo in {workdir}")


def _record_ids(data_dir: str, rows: np.ndarray) -> list[str]:
    from vital_jax.data.records import RECORDS_FILE, read_records

    recs = read_records(os.path.join(data_dir, RECORDS_FILE))
    return [recs[int(r)].id for r in rows if 0 <= int(r) < len(recs)]


def phase_checkpointer(config, workdir: str, phase: int) -> ckpt_lib.PhaseCheckpointer:
    """The checkpoints of curriculum phase `phase` (from 1): workdir/phase_<phase>/."""
    return ckpt_lib.PhaseCheckpointer.from_config(os.path.join(workdir, f"phase_{phase}"), config.checkpoint)


def resume_point(config, workdir: str, state) -> tuple[int, object, dict | None]:
    """Where the curriculum resumes: (phase, state, iterator state) of the newest checkpoint that can be read, or
    (1, `state`, None) when there is none. The last phase with checkpoints is tried first; when none of them can
    be read (each is moved aside with a warning: `PhaseCheckpointer.restore_latest`), the phase before it."""
    for phase in range(len(config.curriculum.max_k), 0, -1):
        directory = os.path.join(workdir, f"phase_{phase}")
        if not os.path.isdir(directory) or not any(name.isdigit() for name in os.listdir(directory)):
            continue
        with phase_checkpointer(config, workdir, phase) as ckpt:
            found = ckpt.restore_latest(state)
        if found is not None:
            step, state, data_state = found
            cli.status(f"phase {phase}: resuming from step {step}")
            return phase, state, data_state
    return 1, state, None


def _shape_key(tree) -> tuple:
    return jax.tree.structure(tree), tuple((tuple(x.shape), x.dtype) for x in jax.tree.leaves(tree))


def batch_shapes(batch, prompt_width: int, slots: int):
    """The abstract VitalBatch (shapes, dtypes, shardings) of `batch` with another prompt width Tp (the last axis
    of the prefix's input_ids, token_valid, positions and image_feature_index: `PrefixInputs`) and `slots` latent
    slots (step_ids, step_valid (B, slots, Ts)); every other input keeps its shape."""
    def resized(x, axis: int, n: int):
        shape = list(x.shape)
        shape[axis] = n
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=x.sharding)

    a = sharding.abstract_of(batch)
    p = a.prefix
    prefix = p.replace(input_ids=resized(p.input_ids, -1, prompt_width),
                       token_valid=resized(p.token_valid, -1, prompt_width),
                       positions=resized(p.positions, -1, prompt_width),
                       image_feature_index=(None if p.image_feature_index is None
                                            else resized(p.image_feature_index, -1, prompt_width)))
    return a.replace(prefix=prefix, step_ids=resized(a.step_ids, 1, slots), step_valid=resized(a.step_valid, 1, slots))


class AheadPrograms:
    """Train-step programs compiled in a background thread before the batches that need them arrive.

    Every curriculum phase (its number of latent slots, `latent_slots`) and every prompt width its records can
    have (`pipeline.prompt_widths`) is its own XLA program. Compiled at first use, each stalls training: at the
    demo's sizes on 2 CPU cores 30-55 s, about a third of the demo's training time, at the phase boundaries and
    wherever a batch of a new width first appears. Started at the run's first step (whose program the main thread
    is compiling), the thread works through `plan` in order: for each phase, it asks for the prompt widths, then
    compiles one program per width (`shapes(width, slots)` gives the abstract batch). `get` hands a program to
    the training loop, waiting for it when it is being compiled; batches of shapes outside the plan (another patch
    bucket) go through the jitted function as before. A compilation error is raised where the program is used.
    """

    def __init__(self, step_fn, args, shapes, plan, mesh, skip_key=None):
        """step_fn: the jitted train step; args: abstract (state, frozen); shapes(width, slots) -> abstract batch;
        plan: [(slots, widths() -> list[int])] in the order the phases come; skip_key: the program being compiled
        by the caller."""
        import concurrent.futures
        import threading

        self._programs: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

        def work():
            for slots, widths in plan:
                if self._stop.is_set():
                    return
                try:
                    jobs = []
                    for width in widths():
                        abstract_batch = shapes(width, slots)
                        key = _shape_key(abstract_batch)
                        with self._lock:
                            if key == skip_key or key in self._programs:
                                continue
                            self._programs[key] = future = concurrent.futures.Future()
                        jobs.append((future, abstract_batch))
                except Exception as e:  # the data's widths: surfaced by the data pipeline itself when it reads them
                    logging.warning("compiling ahead stopped: %s", e)
                    return
                for future, abstract_batch in jobs:
                    if self._stop.is_set():
                        future.cancel()
                        continue
                    try:
                        with jax.set_mesh(mesh):
                            future.set_result(step_fn.lower(*args, abstract_batch).compile())
                    except Exception as e:  # raised where the program is used (`get`)
                        future.set_exception(e)

        # Not a daemon: a process must not exit while XLA compiles in another thread (it aborts).
        self._thread = threading.Thread(target=work, name="compile-ahead")
        self._thread.start()

    def get(self, batch):
        """The program compiled ahead for `batch`'s shapes (after its compilation, if in progress), or None."""
        with self._lock:
            future = self._programs.get(_shape_key(batch))
        return None if future is None or future.cancelled() else future.result()

    def close(self) -> None:
        """Compile nothing more, waiting for the compilation in progress, if any (one program: a preempted run
        has saved its checkpoint before it gets here)."""
        self._stop.set()
        self._thread.join()


def _compile_ahead(config, paths, pipe_cfg, step_fn, state, frozen, batch, mesh, phase: int,
                   steps_per_phase) -> AheadPrograms:
    """AheadPrograms for phase `phase` (from 1; its first batch is `batch`) and the phases after it that train."""
    from vital_jax.data.pipeline import prompt_widths

    plan = []
    for p in range(phase, len(steps_per_phase) + 1):
        if steps_per_phase[p - 1]:
            max_k = int(config.curriculum.max_k[p - 1])
            widths = functools.partial(prompt_widths, paths.data_dir, paths.tokenizer_dir, pipe_cfg,
                                       config.data.train_split, max_k, min_k(config)[p - 1])
            plan.append((latent_slots(config.vital.k_max, max_k, config.vital.latent_steps_cap), widths))
    return AheadPrograms(step_fn, sharding.abstract_of((state, frozen)), functools.partial(batch_shapes, batch),
                         plan, mesh, skip_key=_shape_key(batch))


def train(config, workdir: str) -> dict:
    """Run (or resume) the whole curriculum; returns a summary with the final metrics and checkpoint dirs.

    Holds the workdir's lock (`workdir_lib.WorkdirLock`) throughout; every checkpointer opened is closed on the
    way out, after an error too (waiting for a save in flight instead of exiting under orbax's threads)."""
    validate_config(config)
    distributed.maybe_initialize_distributed()
    check_mesh(config)
    workdir = workdir_lib.local_workdir(workdir)
    with workdir_lib.WorkdirLock(workdir), contextlib.ExitStack() as checkpointers:
        return _train(config, workdir, checkpointers)


def _train(config, workdir: str, checkpointers: contextlib.ExitStack) -> dict:
    from vital_jax.data.pipeline import (PipelineError, check_answer_lengths, long_reasoning_steps,
                                         make_train_iterator)
    from vital_jax.data.records import load_roi_arrays

    config_json = json.loads(config.to_json_best_effort())
    workdir_lib.check_workdir_config(workdir, config_json, record=False)
    if config.demo.enabled:  # the demo's dataset and models, built on first use
        prepare_demo(workdir, config.demo)
    paths = resolve_paths(config, workdir)
    train_records = workdir_lib.train_records_fingerprint(paths.data_dir, config.data.train_split)
    workdir_lib.check_train_records(workdir, train_records, record=False)
    per_process_batches = batch_sizes(config)
    workdir_lib.check_global_batch(workdir, per_process_batches, jax.process_count(), record=False)
    roi = load_roi_arrays(paths.data_dir)
    if roi is None:
        raise ConfigError(f"{paths.data_dir}: no ROI features; run `python -m vital_jax.data.roi` first")
    roi_dim = int(roi["features"].shape[1])
    check_answer_lengths(paths.data_dir, paths.tokenizer_dir, pipeline_config(config), config.data.train_split)
    cut = long_reasoning_steps(paths.data_dir, paths.tokenizer_dir, pipeline_config(config), config.data.train_split)
    if cut and distributed.is_primary():
        logging.warning("%s", cut)
    cli.status(f"loading the backbone and decoder ({paths.backbone_dir}, {paths.decoder_dir})...")
    model, params = build_model(config, paths, roi_dim)
    full_steps = phase_steps(config, paths.data_dir, capped=False)
    if not all(full_steps):
        raise ConfigError(f"{paths.data_dir}: a curriculum phase has no full batch of records ({full_steps})")
    steps_per_phase = phase_steps(config, paths.data_dir)
    total = sum(steps_per_phase)
    o = config.optimizer
    schedule = trainable.curriculum_schedule(o.lr, steps_per_phase, o.warmup_ratio, o.schedule_scope)
    train_params, _ = trainable.split(params, trainable.trainable_mask(params, config.vital.train_decoder))
    optimizer = trainable.make_optimizer(schedule, o.weight_decay, o.b1, o.b2, o.max_grad_norm,
                                         trainable.weight_decay_mask(train_params))
    state, frozen = init_train_state(params, optimizer, jax.random.PRNGKey(config.seed + 1),
                                     config.vital.train_decoder)
    del params, train_params
    # Parameters, optimizer state and the frozen tree are laid out on the (data, fsdp, tensor) mesh; batches
    # arrive sharded over the batch axes (global_vital_batch). Checkpoints restore into these shardings.
    mesh = sharding.mesh_from_config(config)
    state_shardings, report = sharding.tree_shardings(state, mesh)
    if report.fallbacks and distributed.is_primary():
        logging.warning("%s", report)
    state = sharding.shard(state, state_shardings)
    frozen = sharding.shard(frozen, sharding.shardings_for(frozen, mesh))
    step_fn = jax.jit(functools.partial(train_step, model, optimizer, learning_rate_fn=schedule),
                      donate_argnums=(0,), out_shardings=(state_shardings, None))
    # "phase" schedule scope: each phase after the first starts from fresh AdamW moments (a separate run).
    restart_moments = jax.jit(lambda s: s.replace(opt_state=trainable.fresh_moments(s.opt_state)),
                              donate_argnums=(0,), out_shardings=state_shardings)
    preemption = cli.Preemption()
    peak = peak_flops(config)
    logger = MetricsLogger(workdir, total, progress_every=config.logging.every_steps, desc="vital", peak_flops=peak)
    flops_account = accounting.account(model) if peak else None
    probe = None
    if config.logging.probe_every_steps:
        from vital_jax.probe import Probe

        probe = Probe(model, config, paths, mesh)
    pipe_cfg = pipeline_config(config)
    cli.status(f"training {total} steps over {len(steps_per_phase)} phases {tuple(steps_per_phase)}")
    resume_phase, state, data_state = resume_point(config, workdir, state)
    if logger.jsonl is not None:  # rows logged after that checkpoint by the run that stopped: each step once
        logger.jsonl.rewind(int(state.step))
    recorded = compiled = False
    ahead = None  # AheadPrograms: the later phases' train steps, compiled while this one trains
    ahead_used: set[int] = set()
    last_metrics: dict = {}
    phase_start = 0
    for phase, (max_k, n_steps) in enumerate(zip(config.curriculum.max_k, steps_per_phase), start=1):
        phase_end = phase_start + n_steps
        if phase < resume_phase:  # finished; a later phase's checkpoint holds the state
            phase_start = phase_end
            continue
        ckpt = checkpointers.enter_context(phase_checkpointer(config, workdir, phase))
        # One program per phase, running only the slots its records can use (phase 1 of the curriculum: one).
        slots = latent_slots(config.vital.k_max, int(max_k), config.vital.latent_steps_cap)
        iterator = make_train_iterator(paths.data_dir, paths.tokenizer_dir, pipe_cfg, k_max=int(max_k),
                                       split=config.data.train_split, seed=config.seed + phase,
                                       num_epochs=int(config.curriculum.epochs[phase - 1]),
                                       k_min=min_k(config)[phase - 1])
        if phase == resume_phase and data_state is not None:
            try:
                iterator.set_state(data_state)
            except PipelineError as e:  # saved under another data order
                raise ckpt_lib.CheckpointError(f"{ckpt.directory}: {e}") from e
            except (IndexError, KeyError, ValueError) as e:   # grain: a position outside today's records
                raise ckpt_lib.CheckpointError(
                    f"{ckpt.directory}: the checkpoint's data position does not fit phase {phase}'s records today "
                    f"({e}); the records changed since it was saved: restore them, or train in a new "
                    "--workdir") from e
        done = ckpt.done_step()
        if done is not None and done == int(state.step):
            logging.info("phase %d: already complete (step %d)", phase, done)
            ckpt.close()
            phase_start = phase_end
            continue
        if done is not None:
            logging.warning("phase %d: finished at step %d, but that checkpoint could not be read; training it "
                            "again from step %d", phase, done, int(state.step))
        if o.schedule_scope == "phase" and phase > 1 and int(state.step) == phase_start:
            logging.info("phase %d: AdamW's moments start afresh (optimizer.schedule_scope='phase')", phase)
            state = restart_moments(state)

        def check(raw, slots=slots):
            host = slice_latent_slots(raw, slots, config.vital.latent_steps_cap)
            check_token_ids(host, model.backbone_config.text.vocab_size, model.decoder_config.vocab_size)
            return host

        batches = BatchAhead(iterator, iterator.get_state, check=check,
                             place=lambda host: distributed.global_vital_batch(host, model.backbone_config, mesh),
                             any_process=distributed.any_process if jax.process_count() > 1 else None)
        step = int(state.step)
        while step < phase_end:
            prepared = batches.take()
            batch_np, batch = prepared.host, prepared.device
            if not compiled:
                cli.status("compiling the train step (the first step waits for it)...")
                compiled = True
                if config.curriculum.compile_ahead:
                    ahead = checkpointers.enter_context(contextlib.closing(
                        _compile_ahead(config, paths, pipe_cfg, step_fn, state, frozen, batch, mesh, phase,
                                       steps_per_phase)))
            program = ahead.get(batch) if ahead is not None else None
            if program is not None and phase not in ahead_used:
                cli.status(f"phase {phase}: its train step was compiled ahead")
                ahead_used.add(phase)
            program = program or step_fn
            with jax.set_mesh(mesh):
                state, metrics = program(state, frozen, batch)
            if step + 1 < phase_end:  # during this step, not after it (batch_ahead)
                batches.prepare_next()
            step = int(state.step)
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                ckpt.wait()
                ids = _record_ids(paths.data_dir, batch_np["record_index"][batch_np["example_valid"]])
                raise cli.non_finite_loss(f"non-finite loss {loss} at step {step} (phase {phase}); batch records: "
                                          f"{ids}", ckpt.directory, ckpt.latest_step())
            if not recorded:  # training has started: from now on this workdir belongs to this config
                if distributed.is_primary():
                    workdir_lib.record_workdir_config(workdir, config_json)
                    workdir_lib.check_train_records(workdir, train_records, record=True)
                    workdir_lib.check_global_batch(workdir, per_process_batches, jax.process_count(), record=True)
                recorded = True
            if step % config.logging.every_steps == 0 or step == phase_end:
                last_metrics = {k: float(v) for k, v in metrics.items()}
                last_metrics["phase"] = phase
                samples = distributed.process_sum(batch_np["example_valid"].sum())
                tokens, flops = step_work(model, flops_account, batch, samples, slots)
                last_metrics.update(logger.log(step, last_metrics, samples=samples, tokens=tokens, flops=flops))
            if probe is not None and step % config.logging.probe_every_steps == 0:
                output = probe(state.params, frozen)  # every process: the program spans the mesh
                if logger.tensorboard is not None:
                    probe.write(logger.tensorboard, step, output)
                    logger.tensorboard.flush()
                logger.reset_timer(step)  # the probe is not training time
            # SIGTERM may reach one process or arrive a step apart: saving is collective.
            stop = distributed.any_process(preemption.requested)
            ckpt.save(step, state, prepared.data_state, force=stop)
            if stop:
                ckpt.close()
                logger.close()
                logging.warning("preempted: checkpoint at step %d saved in %s", step, ckpt.directory)
                return {"preempted": True, "step": step}
        if ckpt.latest_step() != int(state.step):
            ckpt.save(int(state.step), state, iterator.get_state(), force=True)
        ckpt.mark_done(int(state.step))
        ckpt.close()
        phase_start = phase_end
    if not last_metrics and logger.jsonl is not None:  # a rerun of a finished run: what its last run logged
        last_metrics = logger.jsonl.last()
    logger.close()
    return {"preempted": False, "step": int(state.step), "metrics": last_metrics, "paths": dataclasses.asdict(paths)}


SUMMARY_FILE = workdir_lib.SUMMARY_FILE


def format_summary(summary: dict, workdir: str, phases: int) -> str:
    """What a finished (or preempted) run tells its user: where it stopped, its last losses and where things are."""
    if summary["preempted"]:
        return f"preempted at step {summary['step']}: checkpoint saved in {workdir}; rerun the same command to resume"
    line = f"training finished at step {summary['step']}"
    m = summary.get("metrics") or {}
    if "loss" in m:
        parts = [f"{name.removesuffix('_loss')} {m[name]:.4f}" for name in ("task_loss", "text_loss", "visual_loss")
                 if name in m]
        line += f"; last logged loss {m['loss']:.4f}" + (f" ({', '.join(parts)})" if parts else "")
    return "\n".join([line, f"  checkpoints  {workdir}/phase_1 .. phase_{phases}",
                      f"  metrics      {workdir}/metrics.jsonl, TensorBoard: {workdir}/tensorboard",
                      f"  summary      {workdir}/{SUMMARY_FILE}"])


def train_medsynapse(config, workdir: str) -> dict:
    """`config.method == "medsynapse"`: join the other processes (`distributed.maybe_initialize_distributed`), build
    the demo's assets when enabled, resolve the paths and run `medsynapse.trainer.train` (which holds the workdir's
    lock and records the config); SIGTERM saves and exits."""
    from vital_jax.medsynapse import trainer

    trainer.validate_config(config)
    distributed.maybe_initialize_distributed()
    check_mesh(config, trainer.stage_batches(config))
    if config.demo.enabled:  # the demo's dataset and backbone, built on first use; its small SigLIP is E_ana
        # Under the workdir's lock, as VITAL's demo builds: two runs would build the same assets at once. The
        # trainer takes the lock again; a run that starts in between is refused there.
        with workdir_lib.WorkdirLock(workdir_lib.local_workdir(workdir)):
            prepare_demo(workdir, config.demo)
        p = resolve_paths(config, workdir)
        paths = trainer.Paths(p.data_dir, p.tokenizer_dir, p.backbone_dir, p.encoder_dir)
    else:
        paths = trainer.configured_paths(config)

    def preempt(signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        trainer.request_preemption()

    signal.signal(signal.SIGTERM, preempt)
    cli.status(f"MedSynapse-V stages {tuple(config.medsynapse.stages)} in {workdir} (the first step of each stage "
               "waits for its compilation)...")
    summary = trainer.train(config, workdir, paths)
    return dict(summary, paths=dataclasses.asdict(paths))


def _run_command(workdir: str, train_fn: Callable[[], dict], describe: Callable[[dict], str], errors: tuple,
                 then: Callable[[dict], None] | None = None) -> None:
    """A training command's body: train, write the summary (process 0), print it, then `then(summary)`. An error a
    user can act on (`errors`: the config, the data, a checkpoint, a non-finite loss) ends the command with its
    message instead of a traceback (`cli.fail`)."""
    try:
        summary = train_fn()
        if distributed.is_primary():
            atomic_write(os.path.join(workdir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2))
        print(describe(summary), flush=True)
        if then is not None:
            then(summary)
    except errors as e:
        cli.fail(e)


def main(argv):
    from vital_jax.data.pipeline import PipelineError

    cli.begin(argv, _CONFIG, _WORKDIR)
    config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
    from vital_jax.data.records import RecordError
    from vital_jax.models.qwen3_vl.prompt import PromptError

    # Errors a user can act on (config, data, checkpoints, a non-finite loss): one line, not a traceback.
    errors = (ConfigError, ckpt_lib.CheckpointError, NonFiniteLossError, PipelineError, RecordError, PromptError,
              FileNotFoundError, distributed.DistributedSetupError, distributed.PrimaryFailedError)
    if config.method == "medsynapse":
        from vital_jax.medsynapse import trainer
        from vital_jax.medsynapse.features import FeatureStoreError

        return _run_command(workdir, lambda: train_medsynapse(config, workdir),
                            lambda summary: trainer.format_summary(summary, workdir), errors + (FeatureStoreError,))

    def then_finish_demo(summary):
        if config.demo.enabled and config.demo.finish and not summary["preempted"]:
            finish_demo(workdir)

    _run_command(workdir, lambda: train(config, workdir),
                 lambda summary: format_summary(summary, workdir, len(config.curriculum.max_k)),
                 errors, then=then_finish_demo)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
