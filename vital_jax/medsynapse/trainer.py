"""MedSynapse-V's three stages as one resumable run: `train(config, workdir, paths)`.

Stages (config.medsynapse.stages, in this order; a run may stop after any):
  warmup  Stage I, semantic alignment (Eq. 2): P_phi trains, backbone frozen.  -> workdir/stage_warmup/

Each stage checkpoints into its own folder (orbax, like VITAL's curriculum phases: trainable state, optimizer,
step, RNG and the grain iterator state) and marks it done at its end; rerunning the same command skips finished
stages, restores the trained parameters they produced and resumes the current stage from its newest checkpoint.
Metrics go to the workdir's metrics.jsonl / TensorBoard with one step count across stages (stage I's steps come
first), each row carrying its `stage`.

The anatomical encoder runs once per dataset, before any stage (`features.build_feature_store`, in
workdir/anatomical/): every stage reads F = E_ana(X) and the counterfactual regions from that store, so no
training program contains the encoder.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vital_jax import checkpoint as ckpt_lib
from vital_jax import sharding
from vital_jax.data.pipeline import PipelineConfig, make_train_iterator, select_records
from vital_jax.medsynapse import stage1
from vital_jax.medsynapse.encoder import anatomical_encoder_from_config, region_mask_provider_from_config
from vital_jax.medsynapse.features import FeatureStore, build_feature_store
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.cached import prefix_inputs
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.observability import MetricsLogger

STAGES = ("warmup",)
FEATURES_DIR = "anatomical"


class NonFiniteLossError(RuntimeError):
    """A stage's loss became NaN/inf; the message names the stage, the step and the batch's records."""


@dataclasses.dataclass(frozen=True)
class Paths:
    """What a MedSynapse-V run reads: the built dataset, the tokenizer, the backbone and E_ana's weights."""

    data_dir: str
    tokenizer_dir: str
    backbone_dir: str
    encoder_dir: str


@dataclasses.dataclass
class Setup:
    """Everything the stages share: the frozen modules and weights, the feature store, the sampler."""

    config: object
    paths: Paths
    backbone: Qwen3VLForConditionalGeneration
    backbone_params: dict
    sampler: DiagnosticMemorySampler
    store: FeatureStore
    pipeline: PipelineConfig


def validate_config(config) -> None:
    """Impossible MedSynapse-V settings are a ConfigError before anything loads."""
    m = config.medsynapse
    unknown = [s for s in m.stages if s not in STAGES]
    if not m.stages or unknown or list(m.stages) != [s for s in STAGES if s in m.stages]:
        raise ConfigError(f"config.medsynapse.stages {tuple(m.stages)} must be a non-empty, ordered subset of "
                          f"{STAGES}")
    if m.stages[0] != "warmup":
        raise ConfigError("config.medsynapse.stages must start with 'warmup' (later stages need the aligned "
                          "sampler it trains)")
    if m.sampler.num_queries < 1 or m.sampler.num_layers < 1:
        raise ConfigError("config.medsynapse.sampler: num_queries and num_layers must be >= 1")
    if m.warmup.epochs < 1 or m.warmup.lr < 0:
        raise ConfigError(f"config.medsynapse.warmup: epochs={m.warmup.epochs} must be >= 1 and lr >= 0")
    if m.warmup.reduction not in stage1.REDUCTIONS:
        raise ConfigError(f"config.medsynapse.warmup.reduction must be one of {stage1.REDUCTIONS}")


def pipeline_config(config) -> PipelineConfig:
    """The shared input pipeline, for MedSynapse-V: prompts (image + question) and reference answers. Records
    carry K-step chains for VITAL; MedSynapse-V reads every record whatever its K (k_max_slots = the records'
    largest K) and ignores the chains and ROI rows."""
    from vital_jax.data.records import MAX_LATENT_STEPS

    d = config.data
    return PipelineConfig(batch_size=d.batch_size, prompt_buckets=tuple(d.prompt_buckets),
                          max_answer_tokens=d.max_answer_tokens, max_step_tokens=d.max_step_tokens,
                          k_max_slots=MAX_LATENT_STEPS, max_pixels=d.max_pixels, min_pixels=d.min_pixels,
                          num_workers=d.num_workers, blind_images=d.blind_images)


def build_setup(config, workdir: str, paths: Paths, load_weights) -> Setup:
    """Load the backbone (frozen base weights) and E_ana, build the feature store, define P_phi.

    load_weights(directory, config, params_module) -> params: how a model directory (HF or converted) is read."""
    m = config.medsynapse
    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                     scan_layers=config.model.scan_layers)
    backbone_config = Qwen3VLConfig.from_pretrained(paths.backbone_dir, **overrides)
    backbone = Qwen3VLForConditionalGeneration(backbone_config)
    backbone_params = load_weights(paths.backbone_dir, backbone_config, qwen3_vl_params)
    encoder_section = dict(m.encoder)
    encoder_section["dir"] = paths.encoder_dir
    encoder_section["feature_layer"] = m.encoder.feature_layer or None
    encoder, encoder_params = anatomical_encoder_from_config(encoder_section)
    store = build_feature_store(paths.data_dir, encoder, encoder_params, os.path.join(workdir, FEATURES_DIR),
                                encoder_id=os.path.abspath(paths.encoder_dir),
                                provider=region_mask_provider_from_config(m.regions),
                                dtype=m.encoder.store_dtype)
    del encoder_params  # no stage needs E_ana's weights once F is stored
    s = m.sampler
    sampler = DiagnosticMemorySampler(SamplerConfig(
        hidden_size=backbone_config.text.hidden_size, num_queries=s.num_queries, num_layers=s.num_layers,
        num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, output_rms=s.output_rms or None, dropout=s.dropout))
    return Setup(config, paths, backbone, backbone_params, sampler, store, pipeline_config(config))


def warmup_batch(batch_np: dict, setup: Setup) -> stage1.WarmupBatch:
    """A pipeline batch (numpy) + its records' stored F -> the device batch of Stage I."""
    prefix = prefix_inputs(batch_np["prompt_ids"], batch_np["prompt_valid"], batch_np.get("image_grid_thw"),
                           batch_np.get("pixel_patches"), setup.backbone.config)
    stored = setup.store.gather(batch_np["record_index"])
    return stage1.WarmupBatch(prefix=prefix, feature_map=jnp.asarray(stored["feature_map"]),
                              answer_ids=jnp.asarray(batch_np["answer_ids"], jnp.int32),
                              answer_valid=jnp.asarray(batch_np["answer_valid"], bool),
                              example_valid=jnp.asarray(batch_np["example_valid"], bool))


def stage_steps(config, data_dir: str, epochs: int) -> int:
    n = len(select_records(data_dir, config.data.train_split, None, k_min=1)) // jax.process_count()
    return int(epochs) * (n // config.data.batch_size)


def _checkpointer(config, workdir: str, stage: str) -> ckpt_lib.PhaseCheckpointer:
    return ckpt_lib.PhaseCheckpointer(os.path.join(workdir, f"stage_{stage}"), config.checkpoint.save_every_steps,
                                      config.checkpoint.keep, config.checkpoint.async_save)


def _record_ids(data_dir: str, rows) -> list[str]:
    from vital_jax.data.records import RECORDS_FILE, read_records

    recs = read_records(os.path.join(data_dir, RECORDS_FILE))
    return [recs[int(r)].id for r in rows if 0 <= int(r) < len(recs)]


def _init_sampler(setup: Setup, seed: int) -> dict:
    feature_map = jnp.zeros((1, *setup.store.grid, setup.store.feature_dim), jnp.float32)
    return setup.sampler.init(jax.random.PRNGKey(seed), feature_map)["params"]


def _run_stage(setup: Setup, workdir: str, stage: str, state, step_fn, make_batch, total: int, offset: int,
               logger: MetricsLogger, epochs: int, seed: int, on_first_step=None):
    """The loop every stage shares: resume, iterate, step, check the loss, log, checkpoint, mark done.
    Returns (final state, preempted, last metrics)."""
    config = setup.config
    with _checkpointer(config, workdir, stage) as ckpt:
        iterator = make_train_iterator(setup.paths.data_dir, setup.paths.tokenizer_dir, setup.pipeline,
                                       k_max=setup.pipeline.k_max_slots, split=config.data.train_split, seed=seed,
                                       num_epochs=epochs)
        found = ckpt.restore_latest(state)
        if found is not None:
            step, state, data_state = found
            iterator.set_state(data_state)
            logging.info("%s: resuming from step %d", stage, step)
        done = ckpt.done_step()
        if done is not None and done == int(state.step):
            logging.info("%s: already complete (step %d)", stage, done)
            return state, False, {}
        if logger.jsonl is not None:
            logger.jsonl.rewind(offset + int(state.step))
        last: dict = {}
        while int(state.step) < total:
            batch_np = next(iterator)
            state, metrics = step_fn(state, make_batch(batch_np))
            step = int(state.step)
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                ckpt.wait()
                ids = _record_ids(setup.paths.data_dir, batch_np["record_index"][batch_np["example_valid"]])
                raise NonFiniteLossError(f"{stage}: non-finite loss {loss} at step {step}; batch records: {ids}. "
                                         f"The last good checkpoint in {ckpt.directory} is intact.")
            if on_first_step is not None:
                on_first_step()
                on_first_step = None
            if step % config.logging.every_steps == 0 or step == total:
                last = {k: float(v) for k, v in metrics.items()}
                last["stage"] = stage
                samples = int(batch_np["example_valid"].sum()) * jax.process_count()
                last.update(logger.log(offset + step, last, samples=samples))
            ckpt.save(step, state, iterator.get_state(), force=_preempted())
            if _preempted():
                ckpt.wait()
                return state, True, last
        if ckpt.latest_step() != int(state.step):
            ckpt.save(int(state.step), state, iterator.get_state(), force=True)
        ckpt.mark_done(int(state.step))
        return state, False, last


_PREEMPTION = {"requested": False}


def request_preemption() -> None:
    """Ask the running stage to save a checkpoint at its next step and return (a SIGTERM handler calls this)."""
    _PREEMPTION["requested"] = True


def _preempted() -> bool:
    return _PREEMPTION["requested"]


def train(config, workdir: str, paths: Paths, load_weights, on_first_step=None) -> dict:
    """Run (or resume) the configured stages; returns {"preempted", "stages": {stage: {"steps", "metrics"}}}.

    load_weights: see `build_setup`. on_first_step: called once after the first optimizer step of this process
    (the CLI records the workdir's config then)."""
    validate_config(config)
    workdir = os.path.abspath(workdir)
    setup = build_setup(config, workdir, paths, load_weights)
    m = config.medsynapse
    totals = {"warmup": stage_steps(config, paths.data_dir, m.warmup.epochs)}
    if not all(totals.values()):
        raise ConfigError(f"{paths.data_dir}: split {config.data.train_split!r} has no full batch of "
                          f"{config.data.batch_size} records")
    mesh = sharding.mesh_from_config(config)
    frozen_backbone = sharding.shard(setup.backbone_params, sharding.shardings_for(setup.backbone_params, mesh))
    logger = MetricsLogger(workdir, sum(totals[s] for s in m.stages), progress_every=config.logging.every_steps,
                           desc="medsynapse")
    summary: dict = {"preempted": False, "stages": {}}
    offset = 0
    try:
        # Stage I: P_phi on the frozen backbone.
        w = m.warmup
        total = totals["warmup"]
        schedule = optax.warmup_cosine_decay_schedule(0.0, w.lr, max(1, int(w.warmup_ratio * total)), total)
        optimizer = stage1.make_optimizer(schedule, w.weight_decay, w.max_grad_norm)
        params = {"sampler": _init_sampler(setup, config.seed), "backbone": frozen_backbone}
        state, frozen = stage1.init_train_state(params, optimizer, jax.random.PRNGKey(config.seed + 1))
        jitted = stage1.make_train_step(setup.backbone, setup.sampler, optimizer, reduction=w.reduction)

        def warmup_step(state, batch):
            with jax.set_mesh(mesh):
                return jitted(state, frozen, batch)

        state, preempted, last = _run_stage(setup, workdir, "warmup", state, warmup_step,
                                            lambda b: warmup_batch(b, setup), total, offset, logger, w.epochs,
                                            config.seed + 1, on_first_step)
        summary["stages"]["warmup"] = {"steps": int(state.step), "metrics": last}
        summary["preempted"] = preempted
    finally:
        logger.close()
    return summary
