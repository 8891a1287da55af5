"""MedSynapse-V's three stages as one resumable run: `train(config, workdir, paths)`.

Stages (config.medsynapse.stages, in this order; a run may stop after any):
  warmup  Stage I, semantic alignment (Eq. 2): P_phi trains, backbone frozen.             -> workdir/stage_warmup/
  ccr     Stage II, causal counterfactual refinement (Eq. 3-5): GRPO on the backbone's
          LoRA adapters (`grpo.py`); P_phi and the base weights frozen.                     -> workdir/stage_ccr/
  imt     Stage III, intrinsic memory transition (Eq. 6-8): A_psi trains (`imt.py`); the
          backbone with Stage II's LoRA and P_phi frozen.                                   -> workdir/stage_imt/

Each stage starts from what the stages before it produced, checkpoints into its own folder (orbax, as VITAL's
curriculum phases: the stage's trainable tree, its optimizer state, step, RNG and the grain iterator state; frozen
weights are never written) and marks itself done at its end. Rerunning the same command (after a preemption or a
kill -9 in any stage) skips the finished stages, restoring the parameters each one trained from its final
checkpoint, and resumes the current stage from its newest checkpoint with the same data order; metrics rows logged
after that checkpoint are moved to metrics.rewound.jsonl. Metrics go to the workdir's metrics.jsonl / TensorBoard
with one step count across stages (stage I's steps first, then II's, then III's), each row carrying its `stage`.
The run holds the workdir's lock and, once its first step has run, records its config (workdir/config.json; a
later run with a different config is refused), its paths (workdir/paths.json) and its training records
(workdir/train_records.json; a rerun after they changed is refused, as VITAL's).

The anatomical encoder runs once per dataset, before any stage (`features.build_feature_store`, in
workdir/anatomical/): every stage reads F = E_ana(X) and the counterfactual regions from that store, so no
training program contains the encoder.

Data: every stage reads the records of `config.data.train_split` through the shared input pipeline (image +
question prompts, reference answers; chains and ROI rows unused). Stage II's prompts are batches of
`ccr.rollout_prompts` records; r_acc compares the decoded completion with the record's answer, closed-ended for
yes/no and location-choice records, open-ended otherwise (`reward.accuracy_reward`; `reward_references`). Stage III
reuses the same data.

Where the paper is silent (all config fields): Stage II runs `ccr.steps` steps (paper 200) of one rollout batch
each, cycling through the data, each step `ccr.num_updates` optimizer updates on its batch (its checkpoints, logged
step and stage total count rollout batches), at a constant lr (1e-5, the authors' skeleton's: the paper gives no
Stage II lr; `ccr.schedule = "warmup_cosine"` anneals it over the stage's steps x num_updates updates);
Stages I and III use warmup-cosine schedules (3 % warmup, the authors' skeleton's); `max_steps` caps Stage I or
III below their epochs (demos and tests).

Reading a trained run (evaluation, export):

    run = trainer.load_trained(workdir)                     # -> TrainedMedSynapse
    run.config       the recorded config (ml_collections)     run.paths     the Paths it trained with (paths.json)
    run.backbone     Qwen3VLForConditionalGeneration, built with Stage II's LoraConfig when "ccr" is done
                     (`run.backbone.lora`), else without LoRA
    run.sampler      DiagnosticMemorySampler (P_phi)          run.autonomous  AutonomousMemory (A_psi) or None
    run.params       {"backbone" (base weights + LoRA leaves if Stage II ran), "sampler", and "autonomous" if
                     Stage III ran}; never the encoder
    run.stages_done  the finished stages, in order            run.steps     {stage: its final step}

The A_psi branch is `deploy.make_generate(run.backbone, run.autonomous, sampling, tail)(deploy.deployable_params(
run.params), prefix)`; the teacher branch is `memory.generate(..., prompt_tail=tail)` with M = P_phi(F), where
tail = `memory_prompt_tail(run.config, prompt.load_tokenizer(run.paths.tokenizer_dir))` puts the memory where
the run trained it (leaving it out, 0, is right for "assistant_turn" runs only). F of the training records is
stored (`load_feature_store(workdir, run.paths)`, checked against the records it was built from), F of other
images comes from `anatomical_encoder(run.config, run.paths)` (its `preprocess` and `feature_map`). Stages count
as finished in config order up to the first without its done marker; each finished stage's final checkpoint
contributes the parameters it trained. A workdir without a finished stage is a CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vital_jax import checkpoint as ckpt_lib
from vital_jax import cli, freeze, sharding
from vital_jax import workdir as workdir_lib
from vital_jax.batch_ahead import BatchAhead
from vital_jax.data.questions import CLOSED_TYPES
from vital_jax.data.pipeline import PipelineConfig, PipelineError, make_train_iterator, select_records
from vital_jax.data.records import MAX_LATENT_STEPS, RECORDS_FILE, Record, RecordError, read_records
from vital_jax.jsonio import atomic_write, read_json
from vital_jax.layers.attention import check_backend as check_attention_backend
from vital_jax.layers.linear import LoraConfig
from vital_jax.medsynapse import autonomous as autonomous_lib
from vital_jax.medsynapse import grpo, imt, stage1
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse import reward as reward_lib
from vital_jax.medsynapse.autonomous import AutonomousConfig, AutonomousMemory
from vital_jax.medsynapse.encoder import (FEATURE_LAYERS, KINDS, REGION_SOURCES, anatomical_encoder_from_config,
                                          region_mask_provider_from_config)
from vital_jax.medsynapse.features import DTYPES as STORE_DTYPES
from vital_jax.medsynapse.features import FeatureStore, build_feature_store
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.hf_config import ConfigError, as_dtype
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl import prompt
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.observability import MetricsLogger

STAGES = ("warmup", "ccr", "imt")
SCHEDULES = ("constant", "warmup_cosine")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FEATURES_DIR = "anatomical"
SUMMARY_FILE = workdir_lib.SUMMARY_FILE
PATHS_FILE = "paths.json"  # the Paths a run trained with, recorded beside its config
# What each stage trains (the rest of its parameter tree is frozen and never checkpointed).
TRAINABLE = {"warmup": stage1.is_trainable, "ccr": grpo.is_trainable, "imt": imt.is_trainable}
# Stage III's step returns its sampled trajectories for inspection; they are arrays, not metrics.
IMT_ARRAYS = ("trajectory", "lengths")


@dataclasses.dataclass(frozen=True)
class Paths:
    """What a MedSynapse-V run reads: the built dataset, the tokenizer, the backbone and E_ana's weights."""

    data_dir: str
    tokenizer_dir: str
    backbone_dir: str
    encoder_dir: str


@dataclasses.dataclass
class Setup:
    """Everything the stages share: the frozen modules and weights, the feature store, the sampler, the records
    (for r_acc's reference answers and error messages) and the tokenizer's end-of-answer ids."""

    config: object
    paths: Paths
    backbone: Qwen3VLForConditionalGeneration
    backbone_params: dict
    sampler: DiagnosticMemorySampler
    store: FeatureStore
    pipeline: PipelineConfig
    records: list[Record]
    tokenizer: object
    eos_token_ids: tuple[int, int]  # <|im_end|>, <|endoftext|>
    pad_token_id: int
    prompt_tail: int  # where the memory sits (`memory.inject`; `prompt_tail`)


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.medsynapse.{field}: {message}")


def _validate_run_fields(config) -> None:
    """The data, checkpoint and logging fields every stage reads (as `train.validate_config` checks VITAL's)."""
    workdir_lib.check_run_fields(config)
    try:
        pipeline_config(config)
    except PipelineError as e:
        raise ConfigError(f"config.data: {e}") from e


def validate_config(config) -> None:
    """Impossible MedSynapse-V settings (and impossible data, checkpoint and logging fields) are a ConfigError
    naming the field, before anything loads."""
    _validate_run_fields(config)
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
    s = m.sampler
    _check(s.num_heads >= 1, "sampler.num_heads", f"{s.num_heads} must be >= 1")
    _check(s.mlp_ratio > 0, "sampler.mlp_ratio", f"{s.mlp_ratio} must be > 0")
    _check(s.output_rms >= 0, "sampler.output_rms", f"{s.output_rms} must be >= 0 (0: plain init)")
    _check(0 <= s.dropout < 1, "sampler.dropout", f"{s.dropout} must lie in [0, 1)")
    e = m.encoder
    _check(e.kind in KINDS, "encoder.kind", f"{e.kind!r} must be one of {KINDS}")
    layers = FEATURE_LAYERS[e.kind]
    _check(not e.feature_layer or e.feature_layer in layers, "encoder.feature_layer",
           f"{e.feature_layer!r} must be empty (the encoder's default, {layers[0]!r}) or one of {layers}")
    try:
        as_dtype(e.dtype)
    except ConfigError as err:
        raise ConfigError(f"config.medsynapse.encoder.dtype: {err}") from None
    _check(e.store_dtype in STORE_DTYPES, "encoder.store_dtype", f"{e.store_dtype!r} must be one of {STORE_DTYPES}")
    r = m.regions
    _check(r.source in REGION_SOURCES, "regions.source", f"{r.source!r} must be one of {REGION_SOURCES}")
    _check(0 < r.threshold <= 1, "regions.threshold", f"{r.threshold} must lie in (0, 1]")
    _check(r.top_k >= 1, "regions.top_k", f"{r.top_k} must be >= 1")
    w = m.warmup
    if w.epochs < 1 or w.lr < 0:
        raise ConfigError(f"config.medsynapse.warmup: epochs={w.epochs} must be >= 1 and lr >= 0")
    if w.reduction not in stage1.REDUCTIONS:
        raise ConfigError(f"config.medsynapse.warmup.reduction must be one of {stage1.REDUCTIONS}")
    _check(w.max_steps >= 0, "warmup.max_steps", f"{w.max_steps} must be >= 0 (0: all epochs)")
    _check(w.weight_decay >= 0, "warmup.weight_decay", f"{w.weight_decay} must be >= 0")
    _check(0 <= w.warmup_ratio <= 1, "warmup.warmup_ratio", f"{w.warmup_ratio} must lie in [0, 1]")
    _check(w.max_grad_norm > 0, "warmup.max_grad_norm", f"{w.max_grad_norm} must be > 0")

    c = m.ccr
    for field, value in (("steps", c.steps), ("max_new_tokens", c.max_new_tokens), ("num_updates", c.num_updates)):
        _check(value >= 1, f"ccr.{field}", f"{value} must be >= 1")
    _check(c.num_generations >= 2, "ccr.num_generations", f"{c.num_generations} must be >= 2 (GRPO normalises "
           "rewards within a group)")
    for field, value in (("rollout_prompts", c.rollout_prompts), ("lr", c.lr), ("weight_decay", c.weight_decay),
                         ("kl_beta", c.kl_beta), ("temperature", c.temperature), ("top_k", c.top_k),
                         ("lambda_acc", c.lambda_acc), ("lambda_causal", c.lambda_causal),
                         ("logprob_chunk", c.logprob_chunk)):
        _check(value >= 0, f"ccr.{field}", f"{value} must be >= 0")
    for field, value in (("max_grad_norm", c.max_grad_norm), ("clip_epsilon", c.clip_epsilon),
                         ("causal_clip", c.causal_clip)):
        _check(value > 0, f"ccr.{field}", f"{value} must be > 0")
    _check(0 < c.top_p <= 1, "ccr.top_p", f"{c.top_p} must lie in (0, 1]")
    _check(c.kl_estimator in grpo.KL_ESTIMATORS, "ccr.kl_estimator", f"must be one of {grpo.KL_ESTIMATORS}")
    _check(c.causal_reduction in reward_lib.CAUSAL_REDUCTIONS, "ccr.causal_reduction",
           f"must be one of {reward_lib.CAUSAL_REDUCTIONS}")
    _check(c.closed_match in reward_lib.CLOSED_MATCHES, "ccr.closed_match",
           f"must be one of {reward_lib.CLOSED_MATCHES}")
    _check(c.open_ended_match in reward_lib.OPEN_MATCHES, "ccr.open_ended_match",
           f"must be one of {reward_lib.OPEN_MATCHES}")
    _check(c.lora.rank >= 1, "ccr.lora.rank", f"{c.lora.rank} must be >= 1")
    _check(c.lora.alpha > 0, "ccr.lora.alpha", f"{c.lora.alpha} must be > 0")
    targets = tuple(c.lora.targets)
    _check(bool(targets) and all(t in LORA_TARGETS for t in targets), "ccr.lora.targets",
           f"{targets} must be a non-empty subset of {LORA_TARGETS}")

    i = m.imt
    for field, value in (("epochs", i.epochs), ("max_new_tokens", i.max_new_tokens)):
        _check(value >= 1, f"imt.{field}", f"{value} must be >= 1")
    for field, value in (("lr", i.lr), ("max_steps", i.max_steps), ("weight_decay", i.weight_decay),
                         ("temperature", i.temperature), ("mlp_hidden", i.mlp_hidden),
                         ("output_rms", i.output_rms), ("memory_match", i.memory_match)):
        _check(value >= 0, f"imt.{field}", f"{value} must be >= 0")
    _check(i.max_grad_norm > 0, "imt.max_grad_norm", f"{i.max_grad_norm} must be > 0")
    _check(0 < i.beta < 1, "imt.beta", f"{i.beta} must lie in (0, 1): Eq. (8)'s JSD_beta is identically 0 at beta "
           "= 0 and 1, so Stage III would train nothing (a one-sided KL is another loss, not these ends)")
    _check(i.init in imt.INITS, "imt.init", f"{i.init!r} must be one of {imt.INITS}")
    _check(memory_position(config) in memory_lib.MEMORY_POSITIONS, "memory_position",
           f"{memory_position(config)!r} must be one of {memory_lib.MEMORY_POSITIONS}")
    for section in ("ccr", "imt"):
        s = m[section]
        _check(s.schedule in SCHEDULES, f"{section}.schedule", f"{s.schedule!r} must be one of {SCHEDULES}")
        _check(0 <= s.warmup_ratio <= 1, f"{section}.warmup_ratio", f"{s.warmup_ratio} must lie in [0, 1]")


def memory_position(config) -> str:
    """Where the run writes its memory (`memory.MEMORY_POSITIONS`); runs recorded before the field existed wrote
    it after the whole prompt."""
    return config.medsynapse.get("memory_position", "assistant_turn")


def memory_prompt_tail(config, tokenizer) -> int:
    """`memory.inject`'s prompt_tail for this run: the prompt tokens written after the memory."""
    return prompt.user_turn_end_length(tokenizer) if memory_position(config) == "user_turn" else 0


def lora_config(config) -> LoraConfig:
    """Stage II's adapters (dropout off: see grpo.py)."""
    lora = config.medsynapse.ccr.lora
    return LoraConfig(rank=int(lora.rank), alpha=float(lora.alpha), dropout=0.0, targets=tuple(lora.targets))


def reward_config(config) -> reward_lib.RewardConfig:
    """Stage II's reward settings (`medsynapse.ccr`)."""
    c = config.medsynapse.ccr
    return reward_lib.RewardConfig(lambda_acc=c.lambda_acc, lambda_causal=c.lambda_causal,
                                   causal_reduction=c.causal_reduction, causal_clip=c.causal_clip,
                                   closed_match=c.closed_match, open_ended_match=c.open_ended_match)


def grpo_config(config, eos_token_ids: tuple[int, ...], pad_token_id: int,
                prompt_tail: int = 0) -> grpo.GRPOConfig:
    c = config.medsynapse.ccr
    reward = reward_config(config)
    return grpo.GRPOConfig(num_generations=c.num_generations, max_new_tokens=c.max_new_tokens,
                           temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                           eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
                           clip_epsilon=c.clip_epsilon, kl_beta=c.kl_beta, kl_estimator=c.kl_estimator,
                           num_updates=c.num_updates, counterfactual_top_k=config.medsynapse.regions.top_k,
                           logprob_chunk=c.logprob_chunk, rollout_relayout=config.medsynapse.rollout_relayout,
                           prompt_tail=prompt_tail, reward=reward)


def learning_rate(lr: float, schedule: str, warmup_ratio: float, total: int):
    """A constant lr, or linear warmup over `warmup_ratio` of `total` steps (at least one) then cosine to 0."""
    if schedule == "constant" or total < 2:
        return optax.constant_schedule(lr)
    warmup = min(max(1, int(warmup_ratio * total)), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)


def rollout_prompts(config) -> int:
    return config.medsynapse.ccr.rollout_prompts or config.data.batch_size


def stage_batches(config) -> dict[str, int]:
    """{config field: records per process in one step} of the configured stages, what must split over the mesh's
    batch axes (`train.check_mesh`): `data.batch_size` for Stages I and III, `medsynapse.ccr.rollout_prompts` for
    Stage II's prompts (when set; 0 is data.batch_size)."""
    batches = {"data.batch_size": config.data.batch_size}  # Stage I always runs (`validate_config`)
    if "ccr" in config.medsynapse.stages and config.medsynapse.ccr.rollout_prompts:
        batches["medsynapse.ccr.rollout_prompts"] = config.medsynapse.ccr.rollout_prompts
    return batches


def pipeline_config(config, batch_size: int | None = None) -> PipelineConfig:
    """The shared input pipeline, for MedSynapse-V: prompts (image + question) and reference answers. Records
    carry K-step chains for VITAL; MedSynapse-V reads every record whatever its K (k_max_slots = the records'
    largest K) and ignores the chains and ROI rows."""
    d = config.data
    return PipelineConfig(batch_size=batch_size or d.batch_size, prompt_buckets=tuple(d.prompt_buckets),
                          max_answer_tokens=d.max_answer_tokens, max_step_tokens=d.max_step_tokens,
                          k_max_slots=MAX_LATENT_STEPS, max_pixels=d.max_pixels, min_pixels=d.min_pixels,
                          num_workers=d.num_workers, blind_images=d.blind_images)


def stage_totals(config, data_dir: str) -> dict[str, int]:
    """Steps of each configured stage: optimizer steps, epochs x full batches of this process's records (capped by
    max_steps), for Stages I and III; rollout batches, `ccr.steps`, for Stage II (each of `ccr.num_updates`
    optimizer steps). A split too small for one batch is a ConfigError."""
    m = config.medsynapse
    n = len(select_records(data_dir, config.data.train_split, None, k_min=1)) // jax.process_count()
    totals = {}
    for stage in m.stages:
        size = rollout_prompts(config) if stage == "ccr" else config.data.batch_size
        if n < size:
            raise ConfigError(f"{data_dir}: split {config.data.train_split!r} has {n} records, fewer than one "
                              f"{stage} batch of {size}")
        if stage == "ccr":
            totals[stage] = int(m.ccr.steps)
        else:
            section = m[stage]
            total = int(section.epochs) * (n // size)
            totals[stage] = min(total, int(section.max_steps)) if section.max_steps else total
    return totals


def configured_paths(config) -> Paths:
    """The paths a config names (data.data_dir, model.backbone_dir, model.tokenizer_dir or the backbone's,
    model.roi_encoder_dir for E_ana), each checked to exist; MedSynapse-V has no decoder. (The demo's assets are
    resolved by the train command, which builds them.)"""
    paths = Paths(config.data.data_dir, config.model.tokenizer_dir or config.model.backbone_dir,
                  config.model.backbone_dir, config.model.roi_encoder_dir)
    for field, path in (("data.data_dir", paths.data_dir), ("model.tokenizer_dir", paths.tokenizer_dir),
                        ("model.backbone_dir", paths.backbone_dir), ("model.roi_encoder_dir", paths.encoder_dir)):
        if not path:
            raise ConfigError(f"config.{field} is empty (or set config.demo.enabled=True for the built-in demo)")
        if not os.path.isdir(path):
            raise ConfigError(f"config.{field}={path!r} does not exist")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Modules and batches
# --------------------------------------------------------------------------------------------------------------


def backbone_config(config, paths: Paths) -> Qwen3VLConfig:
    impl = config.model.get("attention_impl", "xla")
    try:
        check_attention_backend(impl)
    except ValueError as e:
        raise ConfigError(f"model.attention_impl: {e}") from None
    return Qwen3VLConfig.from_pretrained(paths.backbone_dir, dtype=config.model.dtype,
                                         param_dtype=config.model.param_dtype, remat=config.model.remat,
                                         scan_layers=config.model.scan_layers,
                                         remat_policy=config.model.get("remat_policy", "full"), attention_impl=impl)


def anatomical_encoder(config, paths: Paths):
    """E_ana and its weights, as configured (config.medsynapse.encoder, weights from paths.encoder_dir)."""
    m = config.medsynapse
    section = dict(m.encoder)
    section["dir"] = paths.encoder_dir
    section["feature_layer"] = m.encoder.feature_layer or None
    return anatomical_encoder_from_config(section)


def build_sampler(config, hidden_size: int) -> DiagnosticMemorySampler:
    s = config.medsynapse.sampler
    return DiagnosticMemorySampler(SamplerConfig(
        hidden_size=hidden_size, num_queries=s.num_queries, num_layers=s.num_layers, num_heads=s.num_heads,
        mlp_ratio=s.mlp_ratio, output_rms=s.output_rms or None, dropout=s.dropout))


def build_autonomous(config, hidden_size: int) -> AutonomousMemory:
    """A_psi with as many memory vectors as P_phi, so that M_auto stands in for M_pri slot for slot."""
    i = config.medsynapse.imt
    return AutonomousMemory(AutonomousConfig(hidden_size=hidden_size,
                                             num_queries=config.medsynapse.sampler.num_queries,
                                             mlp_hidden=i.mlp_hidden or None, output_rms=i.output_rms or None))


def build_setup(config, workdir: str, paths: Paths) -> Setup:
    """Load the backbone (frozen base weights; a HF or converted directory) and E_ana, build the feature store,
    define P_phi."""
    m = config.medsynapse
    bb_config = backbone_config(config, paths)
    backbone = Qwen3VLForConditionalGeneration(bb_config)
    backbone_params = qwen3_vl_params.load_params(paths.backbone_dir, bb_config)
    encoder, encoder_params = anatomical_encoder(config, paths)
    if encoder.feature_dim % m.sampler.num_heads:  # P_phi attends over F's channels, split into its heads
        raise ConfigError(f"config.medsynapse.sampler.num_heads={m.sampler.num_heads} must divide E_ana's feature "
                          f"dim {encoder.feature_dim} ({paths.encoder_dir})")
    store = build_feature_store(paths.data_dir, encoder, encoder_params, os.path.join(workdir, FEATURES_DIR),
                                encoder_id=os.path.abspath(paths.encoder_dir),
                                provider=region_mask_provider_from_config(m.regions),
                                dtype=m.encoder.store_dtype)
    del encoder_params  # no stage needs E_ana's weights once F is stored
    tokenizer = prompt.load_tokenizer(paths.tokenizer_dir)
    specials = prompt.special_token_ids(tokenizer)
    return Setup(config, paths, backbone, backbone_params, build_sampler(config, bb_config.text.hidden_size), store,
                 pipeline_config(config), read_records(os.path.join(paths.data_dir, RECORDS_FILE)), tokenizer,
                 (specials[prompt.IM_END], specials[prompt.ENDOFTEXT]), specials[prompt.ENDOFTEXT],
                 memory_prompt_tail(config, tokenizer))


def _stored_batch(batch_np: dict, store: FeatureStore, backbone_config: Qwen3VLConfig,
                  mesh) -> tuple[dict, object, dict]:
    """What every stage's batch holds: (the records' stored arrays (numpy), the global VITAL-layout batch, the
    fields prefix, feature_map (F) and example_valid).

    The batch is global and sharded over the mesh's batch axes like VITAL's (`distributed.global_vital_batch`:
    each process supplies its own rows, the images packed per batch shard), so every stage trains data-parallel
    over the mesh and across processes; the stored arrays follow the same rows (`distributed.global_per_example`).
    """
    from vital_jax import distributed  # here: it imports vital_jax.vital (its batch type); medsynapse must not

    stored = store.gather(batch_np["record_index"])
    batch = distributed.global_vital_batch(batch_np, backbone_config, mesh)
    return stored, batch, dict(prefix=batch.prefix,
                               feature_map=distributed.global_per_example(stored["feature_map"], mesh),
                               example_valid=batch.example_valid)


def warmup_batch(batch_np: dict, store: FeatureStore, backbone_config: Qwen3VLConfig,
                 mesh) -> stage1.WarmupBatch:
    """A pipeline batch (numpy) + its records' stored F -> the global device batch of Stage I."""
    _, batch, common = _stored_batch(batch_np, store, backbone_config, mesh)
    return stage1.WarmupBatch(**common, answer_ids=batch.answer_ids, answer_valid=batch.answer_valid)


def prompt_batch(batch_np: dict, setup: Setup, mesh) -> grpo.PromptBatch:
    """A pipeline batch + its records' stored F and counterfactual regions -> Stage II's global rollout prompts."""
    from vital_jax import distributed

    stored, _, common = _stored_batch(batch_np, setup.store, setup.backbone.config, mesh)
    rows = {k: distributed.global_per_example(np.asarray(stored[k], dtype), mesh)
            for k, dtype in (("region_masks", bool), ("region_confidence", np.float32), ("region_valid", bool))}
    return grpo.PromptBatch(**common, **rows)


def imt_batch(batch_np: dict, setup: Setup, mesh) -> imt.IMTBatch:
    """A pipeline batch + its records' stored F (the teacher's input) -> Stage III's global batch."""
    return imt.IMTBatch(**_stored_batch(batch_np, setup.store, setup.backbone.config, mesh)[2])


def reward_references(records: list[Record], split: str, config: reward_lib.RewardConfig
                      ) -> dict[int, reward_lib.Reference]:
    """r_acc's reference for each record of `split`, by its index in `records`: the record's answer, closed-ended for
    yes/no and location-choice records. With `closed_match="closed"` a closed record's reference is what the
    in-domain benchmarks score it against (`benchmarks.closed_question`: its ground truth, options and target), so
    a reward of 1 is an answer that evaluation counts as right; computed for the whole split before training, so a
    record that evaluation could not score either is named before the first step (RecordError)."""
    from vital_jax.eval.benchmarks import closed_question
    from vital_jax.eval.errors import BenchmarkError

    out = {}
    for index, r in enumerate(records):
        if r.split != split:
            continue
        closed = r.question_type in CLOSED_TYPES
        if closed and config.closed_match == "closed":
            try:
                answer, options = closed_question(f"record {r.id!r}", r.question_type, r.question, r.answer,
                                                  r.target)
            except BenchmarkError as e:
                raise RecordError(f"{e}; ccr.closed_match='closed' scores closed records as the in-domain "
                                  "benchmarks do, which cannot pose this one") from e
            out[index] = reward_lib.Reference(answer, False, tuple(options), r.target)
        else:
            out[index] = reward_lib.Reference(r.answer, not closed)
    return out


def accuracy_fn(batch_np: dict, setup: Setup, config: grpo.GRPOConfig,
                references: dict[int, reward_lib.Reference]):
    """r_acc of one rollout batch (host): each completion decoded (end-of-answer tokens dropped, special tokens
    skipped) against its record's reference (`reward_references`)."""
    stop = set(setup.eos_token_ids)

    def decode(ids: list[int]) -> str:
        return setup.tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()

    return reward_lib.text_accuracy_fn(decode, [references[int(r)] for r in batch_np["record_index"]],
                                       config.num_generations, config.reward)


def init_sampler_params(sampler: DiagnosticMemorySampler, store: FeatureStore, seed: int) -> dict:
    """P_phi's parameters as Stage I starts them (seed: the run's)."""
    feature_map = jnp.zeros((1, *store.grid, store.feature_dim), jnp.float32)
    return sampler.init(jax.random.PRNGKey(seed), feature_map)["params"]


def mean_teacher_memory(setup: Setup, sampler_params: dict, split: str, batch_size: int = 64) -> np.ndarray:
    """The per-slot mean of the teacher's memory M_pri = P_phi(F) over the distinct images of `split`'s records
    (N, D) float32: A_psi's starting point under `imt.init = "teacher_mean"`.

    Computed on host-local arrays from the stored F (no backbone, no encoder), identically on every process (each
    holds the whole store). Every image counts once, however many questions it has."""
    rows = sorted({int(setup.store.image_rows[row]) for row, r in enumerate(setup.records) if r.split == split})
    if not rows:
        raise ConfigError(f"{setup.paths.data_dir}: no records in split {split!r} to take the teacher's mean "
                          "memory over (medsynapse.imt.init = 'teacher_mean')")
    from vital_jax import distributed  # here, as in `_stored_batch`

    apply = jax.jit(lambda params, f: setup.sampler.apply({"params": params}, f))
    device = jax.local_devices()[0]
    # P_phi's parameters whole on this process (leaves sharded across processes gathered; every process calls this).
    local_params = jax.device_put(distributed.host_copy(sampler_params), device)
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(setup.store.features[rows[start:start + batch_size]], np.float32)
        n = len(chunk)
        if n < batch_size:  # one compiled shape: the padded rows' memories are dropped below
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
        memory = np.asarray(apply(local_params, jax.device_put(chunk, device)), np.float64)
        total = total + memory[:n].sum(axis=0)
    return (total / len(rows)).astype(np.float32)


def _init_autonomous(autonomous: AutonomousMemory, seed: int) -> dict:
    d = autonomous.config.hidden_size
    return autonomous.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, d)), jnp.ones((1, 1), bool))["params"]


# --------------------------------------------------------------------------------------------------------------
# The stage loop
# --------------------------------------------------------------------------------------------------------------


def _checkpointer(config, workdir: str, stage: str) -> ckpt_lib.PhaseCheckpointer:
    return ckpt_lib.PhaseCheckpointer.from_config(stage_dir(workdir, stage), config.checkpoint)


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, f"stage_{stage}")


@dataclasses.dataclass
class _Loop:
    """What the stages of one `train` call share besides the Setup."""

    setup: Setup
    workdir: str
    mesh: object
    logger: MetricsLogger
    on_first_step: Callable[[], None] | None
    on_step: Callable[[str, int], None] | None


def _run_stage(loop: _Loop, stage: str, state, prepare, step_fn, total: int, offset: int, pipeline: PipelineConfig,
               epochs: int | None, seed: int, finite: tuple[str, ...] = ("loss",)):
    """The loop every stage shares: resume, iterate, step, check the loss, log, checkpoint, mark done.

    prepare(batch_np) -> the step's inputs (made during the previous step, `batch_ahead`); step_fn(state,
    inputs) -> (state, metrics: scalars). epochs: of the data iterator (None: repeat). finite:
    the metrics that must stay finite. Returns (final state, preempted, last logged metrics; when the stage was
    already complete, those its last run logged in metrics.jsonl)."""
    from vital_jax import distributed  # here, as in `_stored_batch`

    setup, config = loop.setup, loop.setup.config
    with _checkpointer(config, loop.workdir, stage) as ckpt:
        found = ckpt.restore_latest(state)
        if found is not None:
            step, state, data_state = found
            logging.info("%s: resuming from step %d", stage, step)
        done = ckpt.done_step()
        if done is not None and done == int(state.step):
            logging.info("%s: already complete (step %d)", stage, done)
            return state, False, loop.logger.jsonl.last({"stage": stage}) if loop.logger.jsonl is not None else {}
        if done is not None:
            logging.warning("%s: finished at step %d, but that checkpoint could not be read; training it again from "
                            "step %d", stage, done, int(state.step))
        iterator = make_train_iterator(setup.paths.data_dir, setup.paths.tokenizer_dir, pipeline,
                                       k_max=pipeline.k_max_slots, split=config.data.train_split, seed=seed,
                                       num_epochs=epochs)
        if found is not None:
            try:
                iterator.set_state(data_state)
            except PipelineError as e:  # saved under another data order
                raise ckpt_lib.CheckpointError(f"{ckpt.directory}: {e}") from e
        if loop.logger.jsonl is not None:  # rows logged after that checkpoint by the run that stopped
            loop.logger.jsonl.rewind(offset + int(state.step))
        last: dict = {}

        def place(batch_np):
            with jax.set_mesh(loop.mesh):
                return prepare(batch_np)

        batches = BatchAhead(iterator, iterator.get_state, place=place,
                             any_process=distributed.any_process if jax.process_count() > 1 else None)
        step = int(state.step)
        while step < total:
            prepared = batches.take()
            batch_np = prepared.host
            state, metrics = step_fn(state, prepared.device)
            if step + 1 < total:  # during this step, not after it
                batches.prepare_next()
            step = int(state.step)
            bad = {k: float(metrics[k]) for k in finite if not np.isfinite(float(metrics[k]))}
            if bad:
                ckpt.wait()
                rows = batch_np["record_index"][batch_np["example_valid"]]
                ids = [setup.records[int(r)].id for r in rows if 0 <= int(r) < len(setup.records)]
                raise cli.non_finite_loss(f"{stage}: non-finite {bad} at step {step}; batch records: {ids}",
                                          ckpt.directory, ckpt.latest_step())
            if loop.on_first_step is not None:
                loop.on_first_step()
                loop.on_first_step = None
            if (offset + step) % config.logging.every_steps == 0 or step == total:
                last = {k: float(v) for k, v in metrics.items()}
                last["stage"] = stage
                samples = distributed.process_sum(batch_np["example_valid"].sum())
                last.update(loop.logger.log(offset + step, last, samples=samples))
            if loop.on_step is not None:
                loop.on_step(stage, step)
            # SIGTERM may reach one process or arrive a step apart: saving is collective, so all stop or none.
            stop = distributed.any_process(_preempted())
            ckpt.save(step, state, prepared.data_state, force=stop)
            if stop:
                ckpt.wait()
                logging.warning("%s: preempted; checkpoint at step %d saved in %s", stage, step, ckpt.directory)
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


# --------------------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------------------


def _warmup(loop: _Loop, frozen_backbone: dict, total: int, offset: int):
    """Stage I: P_phi on the frozen backbone. Returns (state, preempted, metrics, trained phi)."""
    setup, config = loop.setup, loop.setup.config
    w = config.medsynapse.warmup
    optimizer = stage1.make_optimizer(learning_rate(w.lr, "warmup_cosine", w.warmup_ratio, total), w.weight_decay,
                                      w.max_grad_norm)
    params = {"sampler": init_sampler_params(setup.sampler, setup.store, config.seed), "backbone": frozen_backbone}
    state, frozen = stage1.init_train_state(params, optimizer, jax.random.PRNGKey(config.seed + 1))
    jitted = stage1.make_train_step(setup.backbone, setup.sampler, optimizer, reduction=w.reduction,
                                    prompt_tail=setup.prompt_tail)

    def prepare(batch_np):
        return warmup_batch(batch_np, setup.store, setup.backbone.config, loop.mesh)

    def step(state, batch):
        with jax.set_mesh(loop.mesh):
            return jitted(state, frozen, batch)

    state, preempted, last = _run_stage(loop, "warmup", state, prepare, step, total, offset, setup.pipeline,
                                        w.epochs, config.seed + 1)
    return state, preempted, last, state.params["sampler"]


def _ccr(loop: _Loop, backbone: Qwen3VLForConditionalGeneration, frozen_backbone: dict, sampler_params: dict,
         references: dict[int, reward_lib.Reference], total: int, offset: int):
    """Stage II: GRPO on LoRA adapters added to the frozen backbone, P_phi frozen (references: r_acc's, of
    `reward_references`). Returns (state, preempted, metrics, the backbone's params with the trained adapters)."""
    setup, config = loop.setup, loop.setup.config
    c = config.medsynapse.ccr
    cfg = grpo_config(config, setup.eos_token_ids, setup.pad_token_id, setup.prompt_tail)
    # `total` counts rollout batches; the schedule reads optax's count of updates, num_updates per batch.
    optimizer = grpo.make_optimizer(learning_rate(c.lr, c.schedule, c.warmup_ratio, total * c.num_updates),
                                    c.weight_decay, c.max_grad_norm)
    with_lora = grpo.add_lora(jax.random.PRNGKey(config.seed + 5), frozen_backbone, backbone.config, backbone.lora)
    state, frozen = grpo.init_train_state({"sampler": sampler_params, "backbone": with_lora}, optimizer,
                                          jax.random.PRNGKey(config.seed + 2))
    grpo_step = grpo.make_grpo_step(backbone, setup.sampler, cfg, optimizer)

    def prepare(batch_np):
        return prompt_batch(batch_np, setup, loop.mesh), accuracy_fn(batch_np, setup, cfg, references)

    def step(state, inputs):
        with jax.set_mesh(loop.mesh):
            return grpo_step(state, frozen, *inputs)

    state, preempted, last = _run_stage(loop, "ccr", state, prepare, step, total, offset,
                                        pipeline_config(config, rollout_prompts(config)), None, config.seed + 2,
                                        finite=("loss", "reward_mean"))
    return state, preempted, last, freeze.merge(state.params, frozen)["backbone"]


def _imt(loop: _Loop, backbone: Qwen3VLForConditionalGeneration, backbone_params: dict, sampler_params: dict,
         autonomous: AutonomousMemory, total: int, offset: int):
    """Stage III: A_psi distilled from the privileged branch; backbone (+ LoRA) and P_phi frozen."""
    setup, config = loop.setup, loop.setup.config
    i = config.medsynapse.imt
    optimizer = imt.make_optimizer(learning_rate(i.lr, i.schedule, i.warmup_ratio, total), i.weight_decay,
                                   i.max_grad_norm)
    autonomous_params = _init_autonomous(autonomous, config.seed + 4)
    if i.init == "teacher_mean":
        autonomous_params = autonomous_lib.teacher_mean_init(
            autonomous_params, mean_teacher_memory(setup, sampler_params, config.data.train_split))
    params = {"backbone": backbone_params, "sampler": sampler_params, "autonomous": autonomous_params}
    state, frozen = imt.init_train_state(params, optimizer, jax.random.PRNGKey(config.seed + 3))
    sampling = imt.rollout_sampling(setup.eos_token_ids, i.max_new_tokens, i.temperature)
    jitted = imt.make_train_step(backbone, setup.sampler, autonomous, optimizer, sampling, beta=i.beta,
                                 memory_match=i.memory_match, relayout=config.medsynapse.rollout_relayout,
                                 prompt_tail=setup.prompt_tail)

    def prepare(batch_np):
        return imt_batch(batch_np, setup, loop.mesh)

    def step(state, batch):
        with jax.set_mesh(loop.mesh):
            state, metrics = jitted(state, frozen, batch)
        return state, {k: v for k, v in metrics.items() if k not in IMT_ARRAYS}

    state, preempted, last = _run_stage(loop, "imt", state, prepare, step, total, offset, setup.pipeline,
                                        i.epochs, config.seed + 3)
    return state, preempted, last


def train(config, workdir: str, paths: Paths, on_first_step=None, on_step=None) -> dict:
    """Run (or resume) the configured stages. Returns {"preempted", "step" (global), "stages": {stage: {"steps",
    "metrics"}}} for the stages reached (a stage that was already complete reports what its last run logged).

    on_first_step: called once after the first optimizer step of this process.
    on_step(stage, step): called after every optimizer step, before its checkpoint (tests preempt or crash there).
    Holds the workdir's lock; at the first step records the config (workdir/config.json), the paths
    (workdir/paths.json, for `load_trained`) and the training records (workdir/train_records.json), and refuses a
    workdir recorded by a different config or whose training records changed since (a resumed stage would go on
    with another data order and schedule). The one change accepted: more stages after the recorded ones (a
    finished Stage I run continued with CCR and IMT), with any settings of their own (`medsynapse.ccr`, `.imt`:
    they never ran), recorded at the first step of the new stages."""
    validate_config(config)
    workdir = workdir_lib.local_workdir(workdir)
    with workdir_lib.WorkdirLock(workdir):
        config_json = json.loads(config.to_json_best_effort())
        # A run may go on with later stages (a Stage I run continued with CCR), not change the ones it has.
        added = _added_stage_sections(workdir, config.medsynapse.stages)
        workdir_lib.check_workdir_config(workdir, config_json, record=False, extendable=added,
                                         appendable=("medsynapse.stages",))
        train_records = workdir_lib.train_records_fingerprint(paths.data_dir, config.data.train_split)
        workdir_lib.check_train_records(workdir, train_records, record=False)
        batch_sizes = stage_batches(config)   # per process
        workdir_lib.check_global_batch(workdir, batch_sizes, jax.process_count(), record=False)

        def first_step():
            if jax.process_index() == 0:
                workdir_lib.record_workdir_config(workdir, config_json)
                workdir_lib.record_appended_fields(workdir, config_json, ("medsynapse.stages",), with_fields=added)
                workdir_lib.check_train_records(workdir, train_records, record=True)
                workdir_lib.check_global_batch(workdir, batch_sizes, jax.process_count(), record=True)
                absolute = {k: os.path.abspath(v) for k, v in dataclasses.asdict(paths).items()}
                atomic_write(os.path.join(workdir, PATHS_FILE), lambda f: json.dump(absolute, f, indent=2))
            if on_first_step is not None:
                on_first_step()

        return _train(config, workdir, paths, first_step, on_step)


def recorded_stages(workdir: str) -> tuple[str, ...] | None:
    """The stages the run in `workdir` recorded in its config.json (None when nothing is recorded yet)."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path):
        return None
    return tuple(read_json(path, ckpt_lib.CheckpointError).get("medsynapse", {}).get("stages", ()))


def _added_stage_sections(workdir: str, stages) -> tuple[str, ...]:
    """The config sections of the stages that `stages` adds to the run recorded in `workdir` (none when nothing is
    recorded): Stage I's section always binds, every later stage has its own (`medsynapse.ccr`, `medsynapse.imt`)."""
    recorded = recorded_stages(workdir)
    if recorded is None:
        return ()
    return tuple(f"medsynapse.{stage}" for stage in stages if stage not in recorded and stage != "warmup")


def _train(config, workdir: str, paths: Paths, on_first_step, on_step) -> dict:
    setup = build_setup(config, workdir, paths)
    m = config.medsynapse
    # Before Stage I: a record Stage II's reward cannot score is named before any training.
    references = (reward_references(setup.records, config.data.train_split, reward_config(config))
                  if "ccr" in m.stages else {})
    totals = stage_totals(config, paths.data_dir)
    mesh = sharding.mesh_from_config(config)
    frozen_backbone = sharding.shard(setup.backbone_params, sharding.shardings_for(setup.backbone_params, mesh))
    logger = MetricsLogger(workdir, sum(totals.values()), progress_every=config.logging.every_steps,
                           desc="medsynapse")
    loop = _Loop(setup, workdir, mesh, logger, on_first_step, on_step)
    summary: dict = {"preempted": False, "step": 0, "stages": {}}
    offset = 0

    def record(stage, state, preempted, last):
        nonlocal offset
        summary["stages"][stage] = {"steps": int(state.step), "metrics": last}
        summary["step"] = offset + int(state.step)
        summary["preempted"] = preempted
        offset += totals[stage]
        return preempted

    try:
        state, preempted, last, sampler_params = _warmup(loop, frozen_backbone, totals["warmup"], offset)
        if record("warmup", state, preempted, last):
            return summary
        backbone, backbone_params = setup.backbone, frozen_backbone
        if "ccr" in m.stages:
            backbone = Qwen3VLForConditionalGeneration(setup.backbone.config, lora_config(config))
            state, preempted, last, backbone_params = _ccr(loop, backbone, frozen_backbone, sampler_params,
                                                           references, totals["ccr"], offset)
            if record("ccr", state, preempted, last):
                return summary
        if "imt" in m.stages:
            autonomous = build_autonomous(config, setup.backbone.config.text.hidden_size)
            state, preempted, last = _imt(loop, backbone, backbone_params, sampler_params, autonomous,
                                          totals["imt"], offset)
            record("imt", state, preempted, last)
    finally:
        logger.close()
    return summary


def format_summary(summary: dict, workdir: str) -> str:
    """What a finished (or preempted) run tells its user: where each stage stopped, its last numbers, where
    things are."""
    if summary["preempted"]:
        stage = list(summary["stages"])[-1]
        return (f"preempted in stage {stage} at step {summary['stages'][stage]['steps']}: checkpoint saved in "
                f"{stage_dir(workdir, stage)}; rerun the same command to resume")
    shown = {"warmup": (("loss", "answer NLL"),), "ccr": (("reward_mean", "reward"), ("r_acc", "r_acc"),
                                                          ("r_causal", "r_causal")),
             "imt": (("loss", "JSD"),)}
    lines = [f"MedSynapse-V training finished at step {summary['step']}"]
    for stage, result in summary["stages"].items():
        m = result["metrics"]
        numbers = ", ".join(f"{label} {m[key]:.4f}" for key, label in shown[stage] if key in m)
        lines.append(f"  {stage:<7}      {result['steps']} steps" + (f"; last logged {numbers}" if numbers
                                                                      else " (already complete)"))
    stages = list(summary["stages"])
    lines += [f"  checkpoints  {stage_dir(workdir, stages[0])} .. {stage_dir(workdir, stages[-1])}",
              f"  metrics      {workdir}/metrics.jsonl, TensorBoard: {workdir}/tensorboard",
              f"  summary      {workdir}/{SUMMARY_FILE}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# A trained run
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedMedSynapse:
    """A MedSynapse-V workdir's modules and trained parameters (see the module docstring)."""

    config: object
    paths: Paths
    backbone: Qwen3VLForConditionalGeneration
    sampler: DiagnosticMemorySampler
    autonomous: AutonomousMemory | None
    params: dict
    stages_done: tuple[str, ...]
    steps: dict[str, int]
    # Predictors built for this run (`predict.shared_predictor`), by (memory, batch_size, max_new_tokens): the
    # evaluations of several splits (the study's test and select) reuse one compiled program per branch and shape.
    predictors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a MedSynapse-V run recorded in `workdir` (CheckpointError if there is none or it is another
    method's), with JSON's lists turned back into the tuples the config uses and the fields added since the run
    was recorded set to what older code trained with (`workdir.fill_added_fields`)."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    recorded = read_json(path, ckpt_lib.CheckpointError, "not a vital_jax training workdir")
    if not isinstance(recorded, dict):
        raise ckpt_lib.CheckpointError(f"{path}: not a recorded training config (a JSON object)")
    config = ml_collections.ConfigDict(recorded)
    if config.get("method") != "medsynapse" or "medsynapse" not in config:
        raise ckpt_lib.CheckpointError(f"{workdir}: its {workdir_lib.CONFIG_FILE} is not a MedSynapse-V run's "
                                       f"(method={config.get('method')!r})")
    try:
        m = config.medsynapse
        m.stages = tuple(m.stages)
        m.ccr.lora.targets = tuple(m.ccr.lora.targets)
        config.data.prompt_buckets = tuple(config.data.prompt_buckets)
        config.mesh.shape = tuple(config.mesh.shape)
    except (AttributeError, KeyError, TypeError) as e:
        raise ckpt_lib.CheckpointError(f"{path}: not a recorded MedSynapse-V config ({e})") from None
    workdir_lib.fill_added_fields(config)
    return config


def _restore_trained(directory: str, step: int, params: dict, predicate) -> dict:
    """`params` with the leaves `predicate` selects replaced by those of the stage checkpoint at `step`."""
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, predicate))
    abstract = {"params": sharding.cast_floating(train, jnp.float32)}
    wanted = ckpt_lib.flatten_state(abstract)
    path = os.path.join(directory, str(step), "state")
    if not os.path.isdir(path):
        raise ckpt_lib.CheckpointError(f"{directory}: marked done at step {step}, but {path} does not exist")
    saved = ckpt_lib.restore_saved_state(path)
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise ckpt_lib.CheckpointError(f"{path}: lacks {len(missing)} trained parameters of this config "
                                       f"({missing[:3]}); a different config?")
    restored = ckpt_lib.unflatten_state({k: saved[k] for k in wanted}, abstract)["params"]
    return freeze.merge(restored, frozen)


def finished_stages(workdir: str, config=None) -> dict[str, int]:
    """{stage: final step} of the run's finished stages, in config order up to the first that is not (its DONE
    marker). Reads only the recorded config and the markers: no model is loaded."""
    config = read_config(workdir) if config is None else config
    steps = {}
    for stage in config.medsynapse.stages:
        step = ckpt_lib.done_step(stage_dir(workdir, stage))
        if step is None:
            break
        steps[stage] = step
    return steps


def load_trained(workdir: str, upto: str | None = None) -> TrainedMedSynapse:
    """Rebuild the modules and trained parameters of the MedSynapse-V run in `workdir`: base weights from the
    configured backbone, then each finished stage's trained parameters from its final checkpoint (P_phi from
    Stage I, the LoRA adapters from Stage II, A_psi from Stage III). Stages count as finished in config order up
    to the first that is not (its DONE marker). upto: the model as it was when that
    stage finished (the study evaluates one run after each stage); a stage that has not finished is an error."""
    workdir = os.path.abspath(workdir)
    config = read_config(workdir)
    validate_config(config)
    steps = finished_stages(workdir, config)
    if upto is not None:
        if upto not in STAGES:
            raise ValueError(f"upto={upto!r}: expected one of {STAGES}")
        if upto not in steps:
            raise ckpt_lib.CheckpointError(f"{workdir}: stage {upto!r} has not finished (finished: "
                                           f"{tuple(steps) or 'none'})")
        steps = {s: v for s, v in steps.items() if STAGES.index(s) <= STAGES.index(upto)}
    done = list(steps)
    if not done:
        raise ckpt_lib.CheckpointError(f"{workdir}: no finished MedSynapse-V stage (no stage_*/"
                                       f"{ckpt_lib.DONE_FILE}); train it first")
    if upto is None and len(done) < len(config.medsynapse.stages):
        logging.warning("%s: loading the model as it was after stage %r; stage(s) %s of the run have not finished",
                        workdir, done[-1], tuple(s for s in config.medsynapse.stages if s not in done))
    paths = trained_paths(workdir)
    bb_config = backbone_config(config, paths)
    lora = lora_config(config) if "ccr" in done else None
    backbone = Qwen3VLForConditionalGeneration(bb_config, lora)
    store = load_feature_store(workdir, paths)
    sampler = build_sampler(config, bb_config.text.hidden_size)
    params = {"backbone": qwen3_vl_params.load_params(paths.backbone_dir, bb_config),
              "sampler": init_sampler_params(sampler, store, config.seed)}
    autonomous = None
    if lora is not None:
        params["backbone"] = grpo.add_lora(jax.random.PRNGKey(0), params["backbone"], bb_config, lora)
    if "imt" in done:
        autonomous = build_autonomous(config, bb_config.text.hidden_size)
        params["autonomous"] = _init_autonomous(autonomous, config.seed + 4)
    for stage in done:
        params = _restore_trained(stage_dir(workdir, stage), steps[stage], params, TRAINABLE[stage])
    return TrainedMedSynapse(config, paths, backbone, sampler, autonomous, params, tuple(done), steps)


def load_feature_store(workdir: str, paths: Paths) -> FeatureStore:
    """The run's stored F and regions (workdir/anatomical/), refused (FeatureStoreError naming the store and how to
    rebuild it) when they were built from other records than `paths.data_dir`'s records.jsonl now holds: the
    store's rows are record indices, and another records.jsonl of the same length would pair every record with
    another's features."""
    return FeatureStore.load(os.path.join(workdir, FEATURES_DIR), os.path.join(paths.data_dir, RECORDS_FILE))


def trained_paths(workdir: str) -> Paths:
    """The paths the run in `workdir` trained with (its paths.json)."""
    path = os.path.join(workdir, PATHS_FILE)
    recorded = read_json(path, ckpt_lib.CheckpointError, "recorded at a MedSynapse-V run's first step")
    try:
        return Paths(**recorded)
    except TypeError as e:
        raise ckpt_lib.CheckpointError(f"{path}: not a MedSynapse-V paths record ({e})") from e


