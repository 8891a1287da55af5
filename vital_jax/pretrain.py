"""Pretrain a small backbone and auxiliary decoder from random initialisation:
`python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py --workdir=DIR [--config.FIELD=VALUE ...]`.

Three stages (config.stages; the default recipe runs the first two), each resumable and skipped once done:
  backbone  a random Qwen3-VL (vision tower + text decoder) of the configured size learns image + prompt -> text
            on pairs.jsonl: next-token CE on the text tokens (+ <|im_end|>) through exactly VITAL's path at K = 0
            (`latent.encode_prefix`, then `latent.answer_logits` from z_0), so the pretrained model is what VITAL
            inference runs. `backbone.train_parts` chooses the trained parameters: "all", "vision"
            (params["visual"]) or "llm" (language_model + lm_head); the others keep their initial values.
  decoder   a random Qwen3 causal LM learns texts.jsonl (each text + <|im_end|>; CE on every valid next token).
  roi_encoder  a random SigLIP vision tower learns what each of its patches shows: a linear head over the
            patch features ROI features are pooled from (the last encoder block's) predicts the share of each
            tissue class in the patch (`phantom_corpus.patch_labels`; cross-entropy against those shares, each
            class weighted by its mean share to the power -roi_encoder.balance). It stands in for MedSigLIP, whose
            weights cannot be downloaded here: a random tower's patch features are nearly alike (mean pairwise
            cosine 0.87-0.95 on PhantomVQA), so L_visual's targets say little about where anything is. Its
            phantoms are made in memory (config.roi_encoder: seed, count, size), no corpus needed; the head is
            not exported.
Each stage checkpoints into workdir/<stage>_ckpt/ (params, AdamW state, step, loader state), logs train and val
loss to workdir/metrics.jsonl and TensorBoard (workdir/tensorboard/<stage>/), and ends by writing a HF
checkpoint directory, workdir/backbone_hf/, workdir/decoder_hf/ or workdir/roi_encoder_hf/ (config.json,
model.safetensors, the tokenizer (not the encoder's), preprocessor_config.json), which transformers and every
vital_jax tool load like a real checkpoint.
workdir/pretrain_summary.json holds the losses, steps, throughput and wall time of each stage. SIGTERM saves a
checkpoint and exits; a non-finite loss stops the run naming the step and the batch's example ids. Workdir
handling is train's: one run at a time, the config recorded once the first step has run, unreadable checkpoints
moved aside, metrics after the resumed checkpoint moved to metrics.rewound.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from vital_jax import cli
from vital_jax import run as run_lib
from vital_jax import checkpoint as ckpt_lib
from vital_jax import demo_assets
from vital_jax import workdir as workdir_lib
from vital_jax.data import phantom_corpus
from vital_jax.data.roi import RoiEncoder, siglip_roi_encoder
from vital_jax.data import pretrain_corpus as corpus_lib
from vital_jax.jsonio import atomic_write, read_json
from vital_jax.batch_ahead import BatchAhead
from vital_jax.cli import NonFiniteLossError
from vital_jax.models import safetensors_io
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3 import Qwen3ForCausalLM
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl import prompt as prompt_lib
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.siglip import SiglipVisionModel
from vital_jax.models.siglip.preprocessing import SiglipPreprocessor
from vital_jax.observability import JsonlWriter, MetricsLogger, TensorBoardWriter
from vital_jax.vital import latent, losses, trainable
from vital_jax.vital.batch import prefix_inputs

STAGES = ("backbone", "decoder", "roi_encoder")
CORPUS_STAGES = ("backbone", "decoder")  # the stages that read the corpus
TRAIN_PARTS = ("all", "vision", "llm")
SUMMARY_FILE = "pretrain_summary.json"
STAGE_SUMMARY_FILE = "stage_summary.json"  # inside <stage>_ckpt/, written before the stage is marked done


def default_config(variant: str = "") -> ml_collections.ConfigDict:
    """The phantom pretraining recipe (configs/study/pretrain_phantom.py returns it). Variants: "" (the study's
    and the shipped backbone: about 13 minutes for the backbone stage on 2 CPU cores, plus ~2 for the corpus),
    "demo" (a smaller one in about 2 minutes), "quick" (tests: a much smaller model for a few steps).

    Why these sizes (measured; README, "Does training work?"): at 96 px a merged image token covers a third
    of the image side, so "left / center / right" is a whole token; head_dim 32 with rope_theta 1e4 gives MRoPE's
    height and width frequencies that turn visibly between neighbouring image tokens (at Qwen3-VL's 5e6 and a
    small head_dim they barely do). Image appearance (CT bright vs MRI dark organs) is learned within a few hundred
    steps; where structures lie needs thousands (held-out "Report the liver." locations: 45 % for the
    "central part" prior, 50 % at 2,000 steps, 64 % at 6,000, val loss 0.242 -> 0.170), and lesions of a few
    pixels were not learned in 6,000.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A ready corpus (pairs.jsonl, texts.jsonl, tokenizer/); empty: build the phantom corpus into workdir/corpus.
    c.corpus_dir = ""
    c.corpus = phantom_corpus.default_config()
    c.stages = ("backbone", "decoder")
    c.train_split = "train"
    c.val_split = "val"
    # train_parts: which backbone parameters train, "all" | "vision" (params["visual"]) | "llm" (language model +
    # lm_head); the rest stay at their initial values.
    c.corpus.update(num_phantoms=1500, phantom_size=96, modalities=("CT", "MRI"), chain_phantoms=200)
    c.backbone = ml_collections.ConfigDict(dict(
        hidden=96, layers=3, head_dim=32, heads=3, kv_heads=1, intermediate=192,
        vision_depth=3, vision_hidden=64, vision_heads=4, vision_intermediate=128, deepstack=(0,),
        image_pixels=96 * 96, train_parts="all", rope_theta=1e4,
        steps=6000, batch_size=16, lr=1e-3, prompt_buckets=(64, 128), text_buckets=(32, 64, 128)))
    c.decoder = ml_collections.ConfigDict(dict(
        hidden=64, layers=2, head_dim=16, heads=4, kv_heads=1, intermediate=128,
        steps=500, batch_size=32, lr=2e-3, text_buckets=(32, 64, 128)))
    # The ROI encoder (stage roi_encoder, not in the default stages): the study's SigLIP size
    # (`demo_assets.tiny_siglip_config`: an 8 x 8 patch grid at 112 px) on phantoms of PhantomVQA's size,
    # modalities and layout. balance: each class's loss term weighs mean_share ** -balance (0: plain
    # cross-entropy, which "other", ~90 % of the patches, dominates; 1: every class weighs the same in total).
    # Chosen by the pointing game of PhantomVQA's ROI features on its test split (a heatmap cos(f_ROI, patches)
    # peaking inside the mask; 300 pairs): random tower 13.3 %, balance 0.5 x 1,500 steps 19.0 %, 1.0 x 4,000
    # 27.7 %; a wider tower (64 x 3 layers) 22.7 %. (Chosen on test, like the study's data sizes; README.)
    c.roi_encoder = ml_collections.ConfigDict(dict(
        hidden=32, layers=2, heads=2, intermediate=64, image_size=112, patch_size=14,
        seed=2000, phantoms=1000, phantom_size=96, modalities=("CT", "MRI"), layout="varied", val_fraction=0.1,
        padding=0.05, balance=1.0, steps=4000, batch_size=32, lr=2e-3))
    c.optimizer = ml_collections.ConfigDict(dict(warmup_ratio=0.05, weight_decay=0.01, b1=0.9, b2=0.999,
                                                 max_grad_norm=1.0))
    # Validation loss every `every_steps` steps and at the end, over the first `max_examples` of the val split.
    c.eval = ml_collections.ConfigDict(dict(every_steps=100, max_examples=64))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=100, keep=2, async_save=True, atomicity="rename"))
    c.logging = ml_collections.ConfigDict(dict(every_steps=10))
    if variant == "demo":
        c.corpus.update(num_phantoms=300, chain_phantoms=60)
        c.backbone.update(steps=400, lr=3e-3)
        c.decoder.steps = 300
    elif variant == "quick":
        c.corpus.update(num_phantoms=12, chain_phantoms=-1)
        c.backbone.update(hidden=32, layers=2, head_dim=16, heads=2, kv_heads=1, intermediate=64, vision_depth=1,
                          vision_hidden=32, vision_heads=2, vision_intermediate=64, steps=30, batch_size=4,
                          lr=5e-3)
        c.decoder.update(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=60, batch_size=4, lr=5e-3)
        c.roi_encoder.update(phantoms=24, steps=20, batch_size=4, lr=5e-3)
        c.eval.update(every_steps=10, max_examples=8)
        c.checkpoint.update(save_every_steps=10, async_save=False)
        c.logging.every_steps = 5
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (expected '', 'demo' or 'quick')")
    return c


def hf_dir(workdir: str, stage: str) -> str:
    """Where a stage writes its HF checkpoint directory (`run.pretrain_hf_dir`, where the demo looks too)."""
    return run_lib.pretrain_hf_dir(workdir, stage)


def train_parts_predicate(parts: str) -> Callable[[str], bool]:
    """Flax param path ('visual/blocks_0/...') -> trains, for backbone.train_parts."""
    if parts == "all":
        return lambda path: True
    if parts == "vision":
        return lambda path: path.split("/", 1)[0] == "visual"
    if parts == "llm":
        return lambda path: path.split("/", 1)[0] in ("language_model", "lm_head")
    raise ConfigError(f"backbone.train_parts must be one of {TRAIN_PARTS}, got {parts!r}")


def validate_config(config) -> None:
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ConfigError(f"config.stages {tuple(config.stages)} must be a non-empty subset of {STAGES}")
    train_parts_predicate(config.backbone.train_parts)
    for stage in STAGES:
        sc = config[stage]
        if sc.steps < 1 or sc.batch_size < 1 or sc.lr <= 0:
            raise ConfigError(f"config.{stage}: steps, batch_size and lr must be positive")
        for field in ("prompt_buckets", "text_buckets"):
            buckets = tuple(sc.get(field, (1,)))
            if not buckets or min(buckets) < 1:
                raise ConfigError(f"config.{stage}.{field} {buckets} must be one or more positive lengths")
    if config.roi_encoder.balance < 0:
        raise ConfigError(f"config.roi_encoder.balance={config.roi_encoder.balance} must be >= 0")
    ckpt_lib.check_atomicity(config.checkpoint)
    if config.checkpoint.keep < 1 or config.eval.max_examples < 1:
        raise ConfigError("config.checkpoint.keep and eval.max_examples must be >= 1")
    if config.checkpoint.save_every_steps < 1 or config.eval.every_steps < 1 or config.logging.every_steps < 1:
        raise ConfigError("config.checkpoint.save_every_steps, eval.every_steps and logging.every_steps must be >= 1")
    side = math.isqrt(int(config.backbone.image_pixels))
    if side * side != config.backbone.image_pixels or side % 32:
        raise ConfigError(f"backbone.image_pixels={config.backbone.image_pixels} must be the square of a multiple "
                          "of 32 (the patch grid must be even)")


# ---------------------------------------------------------------------------------------------------------------
# Corpus and model construction
# ---------------------------------------------------------------------------------------------------------------


def _corpus_ready(corpus_dir: str) -> bool:
    return all(os.path.exists(os.path.join(corpus_dir, name)) for name in
               (corpus_lib.PAIRS_FILE, corpus_lib.TEXTS_FILE, os.path.join(corpus_lib.TOKENIZER_DIR,
                                                                           "tokenizer.json")))


def resolve_corpus(config, workdir: str) -> str:
    """config.corpus_dir, or the phantom corpus built (once) into workdir/corpus from config.corpus: a finished one
    built with the same settings is reused, a torn one built again, one built with other settings refused."""
    if config.corpus_dir:
        if not _corpus_ready(config.corpus_dir):
            raise ConfigError(f"config.corpus_dir={config.corpus_dir!r} lacks {corpus_lib.PAIRS_FILE}, "
                              f"{corpus_lib.TEXTS_FILE} or {corpus_lib.TOKENIZER_DIR}/tokenizer.json")
        return os.path.abspath(config.corpus_dir)
    corpus_dir = os.path.join(workdir, "corpus")
    # Always through build_corpus: its corpus.json (written last, with the settings) tells a finished corpus of
    # these settings from a torn one or one of other settings (a run stopped before its first checkpoint binds no
    # config); the data files alone cannot.
    if not os.path.exists(os.path.join(corpus_dir, phantom_corpus.SUMMARY_FILE)):
        logging.info("building the phantom corpus in %s", corpus_dir)
    return phantom_corpus.build_corpus(corpus_dir, config.corpus)


def _vocab(tokenizer_dir: str) -> tuple[int, dict[str, int]]:
    tokenizer = prompt_lib.load_tokenizer(tokenizer_dir)
    specials = prompt_lib.special_token_ids(tokenizer)
    return max(tokenizer.get_vocab_size(), max(specials.values()) + 1), specials


def backbone_hf_config(config, tokenizer_dir: str) -> dict:
    """The HF config.json of the backbone that config.backbone describes, over the corpus tokenizer."""
    b = config.backbone
    vocab, specials = _vocab(tokenizer_dir)
    grid = math.isqrt(int(b.image_pixels)) // 16
    return demo_assets.qwen3_vl_hf_config(
        b.hidden, b.layers, head_dim=b.head_dim, heads=b.heads, kv_heads=b.kv_heads, intermediate=b.intermediate,
        vision_depth=b.vision_depth, vision_hidden=b.vision_hidden, vision_heads=b.vision_heads,
        vision_intermediate=b.vision_intermediate, deepstack=tuple(b.deepstack), num_position_embeddings=grid * grid,
        vocab_size=vocab, special_token_ids=specials, rope_theta=float(b.rope_theta))


def decoder_hf_config(config, tokenizer_dir: str) -> dict:
    """The HF config.json of the auxiliary decoder that config.decoder describes."""
    d = config.decoder
    vocab, specials = _vocab(tokenizer_dir)
    return demo_assets.qwen3_hf_config(d.hidden, d.layers, head_dim=d.head_dim, heads=d.heads, kv_heads=d.kv_heads,
                                       intermediate=d.intermediate, vocab_size=vocab,
                                       eos_token_id=specials[prompt_lib.IM_END])


# ---------------------------------------------------------------------------------------------------------------
# Losses (per example, float32) and device batches
# ---------------------------------------------------------------------------------------------------------------


def backbone_example_losses(model: Qwen3VLForConditionalGeneration, params: dict, batch: dict):
    """VITAL's task loss at K = 0: prefix (image + prompt) into a cache of Tp + Ta slots, the first text token
    predicted from z_0, the rest teacher forced. -> (loss (B,), weight (B,) bool)."""
    prefix = batch["prefix"]
    cache_len = prefix.input_ids.shape[1] + batch["answer_ids"].shape[1]
    kv_cache, z0 = latent.encode_prefix(model, params, prefix, cache_len)
    logits = latent.answer_logits(model, params, kv_cache, z0, batch["answer_ids"], batch["answer_valid"])
    per_example, has_tokens = losses.task_loss(logits, batch["answer_ids"], batch["answer_valid"])
    return per_example, has_tokens & batch["example_valid"]


def decoder_example_losses(model: Qwen3ForCausalLM, params: dict, batch: dict):
    """Causal-LM CE over each text's valid next tokens. -> (loss (B,), weight (B,) bool)."""
    ids, valid = batch["ids"], batch["valid"]
    out = model.apply({"params": params}, input_ids=ids[:, :-1], token_valid=valid[:, :-1])
    per_example, has_tokens = losses.token_cross_entropy(out.logits, ids[:, 1:], valid[:, 1:])
    return per_example, has_tokens & batch["example_valid"]


def roi_encoder_example_losses(model: RoiEncoder, params: dict, batch: dict, class_weights: jax.Array):
    """Weighted cross-entropy of the patch head's class distribution against each patch's class shares, the
    mean over the patches. params: {"encoder": SigLIP params, "patch_head": {"kernel" (dv, C), "bias" (C,)}}.
    -> (loss (B,), weight (B,) bool)."""
    features = model.patch_features(params["encoder"], batch["pixels"])  # (B, N, dv)
    head = params["patch_head"]
    log_p = jax.nn.log_softmax(features @ head["kernel"] + head["bias"], axis=-1)  # (B, N, C)
    per_patch = -jnp.sum(batch["targets"] * class_weights * log_p, axis=-1)
    return jnp.mean(per_patch, axis=-1), batch["example_valid"]


def backbone_device_batch(batch: dict, config: Qwen3VLConfig) -> dict:
    prefix = prefix_inputs(batch["prompt_ids"], batch["prompt_valid"], batch["image_grid_thw"],
                           batch["pixel_patches"], config)
    return dict(prefix=prefix, answer_ids=jnp.asarray(batch["answer_ids"]),
                answer_valid=jnp.asarray(batch["answer_valid"]), example_valid=jnp.asarray(batch["example_valid"]))


def decoder_device_batch(batch: dict, config: Qwen3Config) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("ids", "valid", "example_valid")}


def roi_encoder_device_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("pixels", "targets", "example_valid")}


def _check_vocab(batch: dict, keys: tuple[tuple[str, str], ...], vocab: int, examples) -> None:
    for ids_key, valid_key in keys:
        bad = ((batch[ids_key] < 0) | (batch[ids_key] >= vocab)) & batch[valid_key]
        if bad.any():
            rows = batch["record_index"][bad.any(axis=1)]
            raise corpus_lib.CorpusError(f"{ids_key}: token ids outside the model's vocabulary of {vocab} in examples "
                              f"{examples.ids(rows)}")


# ---------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class StageState:
    step: jax.Array
    params: dict  # trainable tree, MaskedNode where frozen
    opt_state: object


@dataclasses.dataclass
class Stage:
    """What differs between the two stages; `run_stage` does the rest."""

    name: str
    model: object
    params: dict  # initial full params
    mask: dict  # trainable leaves
    example_losses: Callable  # (model, params, device batch) -> (loss (B,), weight (B,))
    device_batch: Callable  # numpy batch -> device batch
    train: corpus_lib.TrainBatches
    val: corpus_lib.Examples  # or phantom_corpus.PatchLabelExamples (the same len / ids / batch)
    stage_config: object  # config.backbone / config.decoder / config.roi_encoder
    token_keys: tuple[tuple[str, str], ...]
    vocab: int
    write_hf: Callable[[dict, str], None]  # (full params, out_dir)


def _make_fns(stage: Stage, optimizer, schedule):
    # The frozen tree is an argument, not a closure: captured, it would be baked into the program as constants.
    def loss_fn(train_params, frozen, batch):
        per_example, weight = stage.example_losses(stage.model, trainable.merge(train_params, frozen), batch)
        return losses.weighted_mean(per_example, weight), (per_example, weight)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: StageState, frozen, batch):
        (loss, (per_example, weight)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen,
                                                                                          batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                       bad_examples=~jnp.isfinite(per_example) & weight)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @jax.jit
    def eval_step(train_params, frozen, batch):
        per_example, weight = stage.example_losses(stage.model, trainable.merge(train_params, frozen), batch)
        w = weight.astype(jnp.float32)
        return jnp.sum(jnp.where(weight, per_example, 0.0)), jnp.sum(w)

    return train_step, eval_step


def _evaluate(stage: Stage, eval_step, train_params, frozen, max_examples: int) -> float:
    total, count = 0.0, 0.0
    for batch in corpus_lib.eval_batches(stage.val, stage.stage_config.batch_size, max_examples):
        s, n = eval_step(train_params, frozen, stage.device_batch(batch))
        total, count = total + float(s), count + float(n)
    return total / count if count else float("nan")


def _finished_stage_summary(summary_path: str, out_dir: str) -> dict:
    """The summary of a stage marked done, naming `out_dir`; a ValueError says what is wrong when the summary
    cannot be read or the HF directory lacks its config or weights."""
    summary = read_json(summary_path, ValueError)
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path}: not a JSON object")
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise ValueError(f"{out_dir}: no config.json")
    if not any(os.path.isfile(os.path.join(out_dir, name))
               for name in (safetensors_io.SINGLE_FILE, safetensors_io.INDEX_FILE)):
        raise ValueError(f"{out_dir}: no {safetensors_io.SINGLE_FILE} or {safetensors_io.INDEX_FILE}")
    # The directory where this workdir holds it now: a workdir copied or moved after it finished still names its
    # old place in the stored summary.
    return {**summary, "hf_dir": out_dir}


def run_stage(stage: Stage, config, workdir: str, preemption, stop_after: int | None = None) -> dict:
    """Train (or resume, or skip when done) one stage; returns its summary, with "preempted": True when it
    stopped early (SIGTERM, or `stop_after` steps: a test hook that acts like SIGTERM at that step)."""
    sc, o = stage.stage_config, config.optimizer
    ckpt = ckpt_lib.PhaseCheckpointer.from_config(os.path.join(workdir, f"{stage.name}_ckpt"), config.checkpoint)
    summary_path = os.path.join(ckpt.directory, STAGE_SUMMARY_FILE)
    if ckpt.done_step() is not None and os.path.exists(summary_path):
        try:
            summary = _finished_stage_summary(summary_path, hf_dir(workdir, stage.name))
        except ValueError as e:
            # Restoring the final checkpoint below trains 0 steps and writes the summary and HF directory again.
            logging.warning("%s: finished at step %d, but %s; writing its outputs again from the final checkpoint",
                            stage.name, ckpt.done_step(), e)
        else:
            ckpt.close()
            logging.info("%s: already complete (step %d)", stage.name, ckpt.done_step())
            return summary

    schedule = trainable.warmup_cosine_schedule(sc.lr, sc.steps, o.warmup_ratio)
    train_params, frozen = trainable.split(stage.params, stage.mask)
    optimizer = trainable.make_optimizer(schedule, o.weight_decay, o.b1, o.b2, o.max_grad_norm,
                                         trainable.weight_decay_mask(train_params))
    state = StageState(jnp.zeros((), jnp.int32), train_params, optimizer.init(train_params))
    train_step, eval_step = _make_fns(stage, optimizer, schedule)
    # Carried across resumes in the checkpoint's JSON item beside the loader state.
    progress = {"first_loss": None, "train_seconds": 0.0, "timed_steps": 0, "val_loss": None, "recent": []}
    try:
        found = ckpt.restore_latest(state)
    except BaseException:
        ckpt.abort()
        raise
    if found is not None:
        latest, state, data_state = found
        stage.train.set_state(data_state["loader"])
        progress.update(data_state["progress"])
        logging.info("%s: resumed from step %d", stage.name, latest)

    # The logger draws progress and measures throughput; the records carry the stage (both stages count steps
    # from 1) and TensorBoard gets one run per stage.
    logger = MetricsLogger(workdir, sc.steps, desc=f"pretrain/{stage.name}", progress_every=config.logging.every_steps,
                           tensorboard=False, jsonl=False)
    jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if logger.is_primary else None
    if jsonl is not None:  # this stage's rows logged after the checkpoint by the run that stopped: each step once
        jsonl.rewind(int(state.step), where={"stage": stage.name})
    tensorboard = TensorBoardWriter(os.path.join(workdir, "tensorboard", stage.name)) if logger.is_primary else None

    def record(step, values, perf=None):
        values = {**values, **(perf or {})}
        if jsonl is not None:
            jsonl.write(step, {"stage": stage.name, **values})
        if tensorboard is not None:
            tensorboard.scalars(step, values)
            tensorboard.flush()

    timed_from = None  # (step, time) after this process's first step, which includes compilation
    preempted = False
    config_json = json.loads(config.to_json_best_effort())

    def progress_now(step: int) -> dict:
        if timed_from is None:
            return dict(progress)
        return dict(progress, train_seconds=progress["train_seconds"] + time.perf_counter() - timed_from[1],
                    timed_steps=progress["timed_steps"] + step - timed_from[0])

    def check(batch_np):
        _check_vocab(batch_np, stage.token_keys, stage.vocab, stage.train.examples)
        return batch_np

    batches = BatchAhead(stage.train, stage.train.get_state, check=check, place=stage.device_batch)
    try:
        step = int(state.step)
        while step < sc.steps:
            prepared = batches.take()
            batch_np = prepared.host
            state, metrics = train_step(state, frozen, prepared.device)
            if step + 1 < sc.steps:  # during this step, not after it (batch_ahead)
                batches.prepare_next()
            step, loss = int(state.step), float(metrics["loss"])
            if not np.isfinite(loss):
                ckpt.wait()
                bad = np.asarray(metrics["bad_examples"])
                ids = stage.train.examples.ids(batch_np["record_index"][bad if bad.any() else slice(None)])
                raise cli.non_finite_loss(f"{stage.name}: non-finite loss {loss} at step {step}; examples {ids}",
                                          ckpt.directory, ckpt.latest_step())
            if timed_from is None:
                timed_from = (step, time.perf_counter())
                workdir_lib.record_workdir_config(workdir, config_json)  # training has started
            if progress["first_loss"] is None:
                progress["first_loss"] = loss
            progress["recent"] = (progress.get("recent", []) + [loss])[-config.logging.every_steps:]
            if step % config.logging.every_steps == 0 or step == sc.steps:
                values = dict(loss=loss, grad_norm=float(metrics["grad_norm"]),
                              learning_rate=float(metrics["learning_rate"]))
                record(step, values, logger.log(step, {"loss": loss}, samples=sc.batch_size))
            if step % config.eval.every_steps == 0 or step == sc.steps:
                t0 = time.perf_counter()
                progress["val_loss"] = _evaluate(stage, eval_step, state.params, frozen, config.eval.max_examples)
                record(step, {"val_loss": progress["val_loss"]})
                timed_from = (timed_from[0], timed_from[1] + time.perf_counter() - t0)  # not training time
                logger.reset_timer(step)
            preempted = preemption.requested or (stop_after is not None and step >= stop_after)
            ckpt.save(step, state, {"loader": prepared.data_state, "progress": progress_now(step)},
                      force=preempted)
            if preempted:
                logging.warning("%s: stopping at step %d; checkpoint saved in %s", stage.name, step,
                                ckpt.directory)
                return {"preempted": True, "stage": stage.name, "step": step}
        progress = progress_now(int(state.step))
        final_step = int(state.step)
        if ckpt.latest_step() != final_step:
            ckpt.save(final_step, state, {"loader": stage.train.get_state(), "progress": progress}, force=True)
        if progress["val_loss"] is None:
            progress["val_loss"] = _evaluate(stage, eval_step, state.params, frozen, config.eval.max_examples)
        ckpt.wait()
        out_dir = hf_dir(workdir, stage.name)
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        stage.write_hf(jax.tree.map(np.asarray, trainable.merge(state.params, frozen)), tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        seconds, timed = progress["train_seconds"], progress["timed_steps"]
        summary = {
            "stage": stage.name, "preempted": False, "steps": final_step, "batch_size": sc.batch_size,
            "initial_train_loss": progress["first_loss"],
            "final_train_loss": float(np.mean(progress["recent"])) if progress["recent"] else None,
            "final_val_loss": progress["val_loss"],
            "steps_per_sec": timed / seconds if seconds > 0 else None,
            "samples_per_sec": timed * sc.batch_size / seconds if seconds > 0 else None,
            "train_seconds": seconds, "hf_dir": out_dir,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "total_params": int(sum(x.size for x in jax.tree.leaves(stage.params))),
        }
        atomic_write(summary_path, lambda f: json.dump(summary, f, indent=2))
        ckpt.mark_done(final_step)
        return summary
    except BaseException:
        ckpt.abort()  # wait for a save in flight; the error being raised is the one to report
        raise
    finally:
        ckpt.close()
        logger.close()
        for writer in (jsonl, tensorboard):
            if writer is not None:
                writer.close()


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _backbone_stage(config, corpus_dir: str, tokenizer_dir: str) -> Stage:
    b = config.backbone
    hf = backbone_hf_config(config, tokenizer_dir)
    model_config = Qwen3VLConfig.from_hf_dict(hf, "pretrain backbone")
    params = demo_assets.init_qwen3_vl_params(hf, config.seed, jit=True)
    cfg = corpus_lib.CorpusConfig(batch_size=b.batch_size, prompt_buckets=tuple(b.prompt_buckets),
                                  text_buckets=tuple(b.text_buckets), min_pixels=b.image_pixels,
                                  max_pixels=b.image_pixels)
    train = corpus_lib.PairExamples(corpus_dir, config.train_split, cfg, tokenizer_dir)
    val = corpus_lib.PairExamples(corpus_dir, config.val_split, cfg, tokenizer_dir)
    return Stage(
        name="backbone", model=Qwen3VLForConditionalGeneration(model_config), params=params,
        mask=trainable.mask_from_predicate(params, train_parts_predicate(b.train_parts)),
        example_losses=backbone_example_losses,
        device_batch=functools.partial(backbone_device_batch, config=model_config),
        train=corpus_lib.TrainBatches(train, b.batch_size, config.seed), val=val, stage_config=b,
        token_keys=(("prompt_ids", "prompt_valid"), ("answer_ids", "answer_valid")),
        vocab=model_config.text.vocab_size,
        write_hf=lambda p, out: demo_assets.save_qwen3_vl(out, hf, p, b.image_pixels, tokenizer_dir))


def _decoder_stage(config, corpus_dir: str, tokenizer_dir: str) -> Stage:
    d = config.decoder
    hf = decoder_hf_config(config, tokenizer_dir)
    model_config = Qwen3Config.from_hf_dict(hf, "pretrain decoder")
    params = demo_assets.init_qwen3_params(hf, config.seed + 1, jit=True)
    cfg = corpus_lib.CorpusConfig(batch_size=d.batch_size, text_buckets=tuple(d.text_buckets))
    train = corpus_lib.TextExamples(corpus_dir, config.train_split, cfg, tokenizer_dir)
    val = corpus_lib.TextExamples(corpus_dir, config.val_split, cfg, tokenizer_dir)
    return Stage(
        name="decoder", model=Qwen3ForCausalLM(model_config), params=params,
        mask=trainable.mask_from_predicate(params, lambda path: True),
        example_losses=decoder_example_losses,
        device_batch=functools.partial(decoder_device_batch, config=model_config),
        train=corpus_lib.TrainBatches(train, d.batch_size, config.seed + 1), val=val, stage_config=d,
        token_keys=(("ids", "valid"),), vocab=model_config.vocab_size,
        write_hf=lambda p, out: demo_assets.save_qwen3(out, hf, p, tokenizer_dir))


def _roi_encoder_stage(config, corpus_dir: str | None, tokenizer_dir: str | None) -> Stage:
    e = config.roi_encoder
    model_config = demo_assets.tiny_siglip_config(e.hidden, e.layers, e.heads, e.intermediate, e.image_size,
                                                  e.patch_size)
    model = SiglipVisionModel(model_config)
    preprocessor = SiglipPreprocessor.from_hf_dict(demo_assets.siglip_preprocessor_config(e.image_size))
    encoder = siglip_roi_encoder(model, preprocessor)  # the features roi.py pools (the last block's output)
    train = phantom_corpus.PatchLabelExamples(e, config.train_split, model_config.grid_size, preprocessor)
    val = phantom_corpus.PatchLabelExamples(e, config.val_split, model_config.grid_size, preprocessor)
    shares = np.maximum(train.class_shares(), 1e-6)  # a class no training patch shows weighs as a rare one
    weights = shares ** -float(e.balance)
    weights = jnp.asarray(weights / np.sum(shares * weights), jnp.float32)  # the mean patch weighs 1
    key_encoder, key_head = jax.random.split(jax.random.PRNGKey(config.seed + 2))
    classes = len(phantom_corpus.PATCH_CLASSES)
    params = {"encoder": model.init(key_encoder, model.dummy_input())["params"],
              "patch_head": {"kernel": 0.02 * jax.random.normal(key_head, (model_config.hidden_size, classes)),
                             "bias": jnp.zeros((classes,))}}
    return Stage(
        name="roi_encoder", model=encoder, params=params,
        mask=trainable.mask_from_predicate(params, lambda path: True),
        example_losses=functools.partial(roi_encoder_example_losses, class_weights=weights),
        device_batch=roi_encoder_device_batch,
        train=corpus_lib.TrainBatches(train, e.batch_size, config.seed + 2), val=val, stage_config=e,
        token_keys=(), vocab=0,
        write_hf=lambda p, out: demo_assets.save_siglip(out, model_config, p["encoder"]))


def pretrain(config, workdir: str, stop_after: tuple[str, int] | None = None) -> dict:
    """Run (or resume) the configured stages; returns {"preempted", "stages": {name: summary}, "wall_seconds",
    "corpus_dir"} and writes it to workdir/pretrain_summary.json when every stage is done.

    stop_after: (stage, step) stops that stage at that step as SIGTERM would (tests of resumption).
    """
    validate_config(config)
    workdir = workdir_lib.local_workdir(workdir)
    with workdir_lib.WorkdirLock(workdir):
        return _pretrain(config, workdir, stop_after)


def _pretrain(config, workdir: str, stop_after: tuple[str, int] | None) -> dict:
    # roi_encoder came later: a workdir recorded before it has no such section.
    workdir_lib.check_workdir_config(workdir, json.loads(config.to_json_best_effort()), record=False,
                                     new_sections=("roi_encoder",))
    start = time.perf_counter()
    corpus_dir = tokenizer_dir = None
    if any(stage in CORPUS_STAGES for stage in config.stages):
        corpus_dir = resolve_corpus(config, workdir)
        tokenizer_dir = os.path.join(corpus_dir, corpus_lib.TOKENIZER_DIR)
    preemption = cli.Preemption()
    builders = {"backbone": _backbone_stage, "decoder": _decoder_stage, "roi_encoder": _roi_encoder_stage}
    summaries = {}
    for name in config.stages:
        stage = builders[name](config, corpus_dir, tokenizer_dir)
        stop = stop_after[1] if stop_after is not None and stop_after[0] == name else None
        summaries[name] = run_stage(stage, config, workdir, preemption, stop)
        if summaries[name]["preempted"]:
            return {"preempted": True, "stages": summaries, "corpus_dir": corpus_dir}
    summary = {"preempted": False, "stages": summaries, "corpus_dir": corpus_dir,
               "wall_seconds": time.perf_counter() - start}
    atomic_write(os.path.join(workdir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    """A few lines: per stage its losses, throughput and HF directory."""
    lines = []
    for name, s in summary["stages"].items():
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"{name}: {s['steps']} steps, train loss {fmt(s['initial_train_loss'], '.3f')} -> "
                     f"{fmt(s['final_train_loss'], '.3f')}, val loss {fmt(s['final_val_loss'], '.3f')}, "
                     f"{fmt(s['steps_per_sec'], '.2f')} steps/s = {fmt(s['samples_per_sec'], '.1f')} samples/s; "
                     f"{s['hf_dir']}")
    return "\n".join(lines)


_CONFIG = None
_WORKDIR = None


def main(argv):
    cli.begin(argv, _CONFIG, _WORKDIR)
    try:
        summary = pretrain(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, corpus_lib.CorpusError, ckpt_lib.CheckpointError, NonFiniteLossError) as e:
        cli.fail(e)
    if summary["preempted"]:
        print("preempted; rerun the same command to resume")
        return
    print(format_summary(summary))
    print(f"summary: {os.path.join(os.path.abspath(_WORKDIR.value), SUMMARY_FILE)}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/study/pretrain_phantom.py[:quick]",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the HF directories go")
    app.run(main, flags_parser=cli.parse_flags)
