"""A VITAL run: its paths, its model and its parameters, for every command that trains or reads one.

    paths = resolve_paths(config, workdir)            # data, tokenizer, backbone, decoder, ROI encoder
    model, params = build_model(config, paths, roi_dim)  # VitalModel + base weights + fresh VITAL parameters
    run = load_run(workdir)                           # a trained run: saved config, model, trained parameters

train, evaluate, explain, the HF export and the demo all go through here, so that a run directory has one
owner. A demo run's assets live in `workdir/demo/` (built by `vital_jax.demo.prepare`, which records them in
READY.json); every other run names its checkpoints and data in the config.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging

from vital_jax import assets
from vital_jax import checkpoint as ckpt_lib
from vital_jax.jsonio import read_json
from vital_jax.layers.attention import check_backend as check_attention_backend
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.vital import trainable
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel
from vital_jax.workdir import CONFIG_FILE, SUMMARY_FILE, fill_added_fields

DEMO_DIR = "demo"
DEMO_READY_FILE = "READY.json"  # written by `demo.prepare` when the demo's assets are complete
SHIPPED = "shipped"  # config.demo.pretrain value: start from vital_jax.assets.phantom_vlm()


@dataclasses.dataclass
class Paths:
    data_dir: str
    tokenizer_dir: str
    backbone_dir: str
    decoder_dir: str
    encoder_dir: str = ""


def pretrain_hf_dir(workdir: str, stage: str) -> str:
    """Where `vital_jax.pretrain` writes a stage's ("backbone", "decoder") HF checkpoint directory."""
    return os.path.join(os.path.abspath(workdir), f"{stage}_hf")


def demo_paths(root: str, models: str) -> Paths:
    """The demo's paths under `root` (workdir/demo); models "shipped" (the package's pair) or "pretrain"
    (pretrained into root/pretrain)."""
    if models == SHIPPED:
        backbone, decoder = assets.phantom_vlm().values()
    else:
        backbone = pretrain_hf_dir(os.path.join(root, "pretrain"), "backbone")
        decoder = pretrain_hf_dir(os.path.join(root, "pretrain"), "decoder")
    return Paths(os.path.join(root, "data"), backbone, backbone, decoder, os.path.join(root, "roi_encoder"))


def demo_models(root: str) -> str:
    """Which models ("shipped" or "pretrain") the demo's READY.json in `root` (workdir/demo) records; ConfigError
    naming the file when it cannot be read (`demo.prepare` then builds the assets again)."""
    ready = os.path.join(root, DEMO_READY_FILE)
    record = read_json(ready, ConfigError)
    if not isinstance(record, dict) or record.get("models") not in (SHIPPED, "pretrain"):
        raise ConfigError(f"{ready}: not a demo record (no \"models\": {SHIPPED!r} or 'pretrain'); rebuild the "
                          "demo's assets by rerunning python -m vital_jax.train --config=configs/demo.py")
    return record["models"]


def resolve_paths(config, workdir: str) -> Paths:
    """The demo's assets (`config.demo.enabled`; built beforehand by `demo.prepare`) or the configured paths,
    each checked to exist."""
    if config.demo.enabled:
        root = os.path.join(os.path.abspath(workdir), DEMO_DIR)
        ready = os.path.join(root, DEMO_READY_FILE)
        if not os.path.exists(ready):
            raise ConfigError(f"{root}: the demo's assets are not built (python -m vital_jax.train "
                              "--config=configs/demo.py builds them)")
        # Paths are rebuilt from `root`, so a copied demo folder uses its own files.
        paths = demo_paths(root, demo_models(root))
        for name, path in (("backbone", paths.backbone_dir), ("decoder", paths.decoder_dir)):
            if not os.path.isdir(path):
                raise ConfigError(f"{path}: the demo's {name} is missing ({ready} says the assets were built)")
        return paths
    paths = Paths(config.data.data_dir, config.model.tokenizer_dir or config.model.backbone_dir,
                  config.model.backbone_dir, config.model.decoder_dir, config.model.roi_encoder_dir)
    for field, path in (("data.data_dir", paths.data_dir), ("model.tokenizer_dir", paths.tokenizer_dir),
                        ("model.backbone_dir", paths.backbone_dir), ("model.decoder_dir", paths.decoder_dir)):
        if not path:
            raise ConfigError(f"config.{field} is empty (or set config.demo.enabled=True for the built-in demo)")
        if not os.path.isdir(path):
            raise ConfigError(f"config.{field}={path!r} does not exist")
    return paths


def build_model(config, paths: Paths, roi_dim: int) -> tuple[VitalModel, dict]:
    """The VitalModel of a run config, with the base weights of `paths` and freshly initialised VITAL parameters
    (LoRA, pj_in, visual projector) from `config.seed`."""
    try:
        check_attention_backend(config.model.attention_impl)
    except ValueError as e:
        raise ConfigError(f"model.attention_impl: {e}") from None
    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                     scan_layers=config.model.scan_layers, attention_impl=config.model.attention_impl,
                     remat_policy=config.model.remat_policy)
    backbone_config = Qwen3VLConfig.from_pretrained(paths.backbone_dir, **overrides)
    decoder_config = Qwen3Config.from_pretrained(paths.decoder_dir, **{**overrides, "param_dtype": "float32"})
    v = config.vital
    lora = LoraConfig(rank=v.lora_rank, alpha=v.lora_alpha, dropout=v.lora_dropout) if v.lora_rank else None
    vital_config = VitalConfig(k_max=v.k_max, lambda_text=v.lambda_text, lambda_visual=v.lambda_visual,
                               roi_dim=roi_dim, vp_dropout=v.vp_dropout, visual_loss_reduction=v.visual_loss_reduction,
                               task_loss_reduction=v.task_loss_reduction, visual_target=v.visual_target, lora=lora,
                               remat_latent_steps=v.remat_latent_steps,
                               train_decoder=v.train_decoder, latent_steps_cap=v.latent_steps_cap,
                               latent_input=v.latent_input)
    model = VitalModel(vital_config, backbone_config, decoder_config)
    backbone = qwen3_vl_params.load_params(paths.backbone_dir, backbone_config)  # HF or converted
    decoder = qwen3_params.load_params(paths.decoder_dir, decoder_config)
    params = model.init_params(jax.random.PRNGKey(config.seed), backbone, decoder)
    return model, params


@dataclasses.dataclass
class TrainedRun:
    config: ml_collections.ConfigDict
    model: VitalModel
    params: dict  # full parameters (backbone incl. LoRA, decoder, pj_in, visual_projector)
    paths: Paths
    step: int
    phase: int = 0   # the curriculum phase (from 1) whose checkpoint the parameters came from
    # Whether that is the end of the curriculum: the last phase's completion marker records this step. False for a
    # run still training, stopped or preempted (evaluation and export record it beside the step).
    finished: bool = True
    # Predictors built for this run (`inference.shared_predictor`), by (batch_size, max_new_tokens): evaluation and
    # the explanation that follows it reuse one compiled program instead of compiling it twice.
    predictors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run recorded in `workdir` (CheckpointError if there is none), with the fields that
    later versions added set to what older runs trained with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ckpt_lib.CheckpointError(f"{workdir}: no {CONFIG_FILE}; not a vital_jax training workdir")
    recorded = read_json(path, ckpt_lib.CheckpointError)
    if not isinstance(recorded, dict):
        raise ckpt_lib.CheckpointError(f"{path}: not a recorded training config (a JSON object)")
    config = ml_collections.ConfigDict(recorded)
    try:
        _tuples(config)
    except (AttributeError, KeyError, TypeError) as e:
        raise ckpt_lib.CheckpointError(f"{path}: not a recorded training config ({e})") from None
    fill_added_fields(config)
    return config


def load_run(workdir: str) -> TrainedRun:
    """Rebuild model and parameters of the training run in `workdir` (raises CheckpointError if none): base weights
    from the configured checkpoints, trained parameters (LoRA + scaffolding) from the latest checkpoint of the
    last phase that has one.

    A run that has not finished its curriculum (a phase without a checkpoint, or a last phase whose completion
    marker does not record this step: still training, stopped, preempted) loads with a warning naming the phase
    and step it loads, and `finished=False`; a run whose train_summary.json says it finished at a later step
    (checkpoints removed or damaged since) is refused. The visual projector's ROI dimension comes from the
    checkpoint itself, so the run loads without its training data.
    """
    workdir = os.path.abspath(workdir)   # orbax takes absolute paths only
    config = read_config(workdir)
    paths = resolve_paths(config, workdir)
    phases = len(config.curriculum.max_k)
    found = _latest_checkpoint(workdir, phases, config.checkpoint)
    if found is None:
        raise ckpt_lib.CheckpointError(f"{workdir}: no training checkpoint found in phase_*/")
    phase, step = found
    finished = _check_finished(workdir, phase, phases, step)
    state_dir = os.path.join(workdir, f"phase_{phase}", str(step), "state")
    saved = ckpt_lib.restore_saved_state(state_dir)
    if ROI_DIM_KEY not in saved:
        raise ckpt_lib.CheckpointError(f"{state_dir}: no {ROI_DIM_KEY}; not a VITAL training checkpoint")
    model, params = build_model(config, paths, int(saved[ROI_DIM_KEY].shape[0]))
    mask = trainable.trainable_mask(params, config.vital.train_decoder)
    train_params, frozen = trainable.split(params, mask)
    abstract = {"params": train_params}
    flat = ckpt_lib.flatten_state(abstract)
    missing = sorted(k for k in flat if k not in saved)
    if missing:
        raise ckpt_lib.CheckpointError(f"{state_dir}: checkpoint does not match the run's config ({len(missing)} "
                                       f"parameters missing, e.g. {missing[0]})")
    restored = ckpt_lib.unflatten_state({k: saved[k] for k in flat}, abstract)["params"]
    return TrainedRun(config, model, trainable.merge(restored, frozen), paths, step, phase, finished)


# The visual projector's output bias: its length is the ROI feature dimension dv the run trained with.
ROI_DIM_KEY = "params.visual_projector.fc2.bias"


def _latest_checkpoint(workdir: str, phases: int, checkpoint_config) -> tuple[int, int] | None:
    """(phase, step) of the latest checkpoint of the last phase that has one, or None (the run's own
    `config.checkpoint.atomicity` tells a finished step from one still being written)."""
    for phase in range(phases, 0, -1):
        directory = os.path.join(workdir, f"phase_{phase}")
        if not os.path.isdir(directory):
            continue
        ckpt = ckpt_lib.PhaseCheckpointer.from_config(directory, checkpoint_config)
        step = ckpt.latest_step()
        ckpt.close()
        if step is not None:
            return phase, step
    return None


def _check_finished(workdir: str, phase: int, phases: int, step: int) -> bool:
    """Refuse a finished run whose checkpoints no longer reach its recorded end; warn about an unfinished one.
    Returns whether the run finished its curriculum at `step`."""
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    if os.path.exists(summary_path):
        summary = read_json(summary_path, ckpt_lib.CheckpointError)
        finished_at = summary.get("step") if isinstance(summary, dict) and summary.get("preempted") is False else None
        # A later step is a run resumed since (longer curriculum); an earlier one lost checkpoints.
        if isinstance(finished_at, int) and step < finished_at:
            raise ckpt_lib.CheckpointError(
                f"{workdir}: {SUMMARY_FILE} says training finished at step {finished_at}, but the latest "
                f"checkpoint is step {step} of phase_{phase} (checkpoints removed or damaged since?)")
    if phase < phases:
        logging.warning("%s: the run did not finish its curriculum (phase_%d of %d has no checkpoint); loading "
                        "phase_%d's step %d", workdir, phase + 1, phases, phase, step)
        return False
    done = ckpt_lib.done_step(os.path.join(workdir, f"phase_{phase}"))
    if done != step:
        logging.warning("%s: the run did not finish its curriculum (phase_%d, the last, has no completion marker "
                        "for step %d: still training, stopped or preempted); loading that step", workdir, phase, step)
        return False
    return True


def _tuples(config) -> None:
    """JSON turns tuples into lists; the training config uses tuples for these fields."""
    config.curriculum.max_k = tuple(config.curriculum.max_k)
    config.curriculum.epochs = tuple(config.curriculum.epochs)
    config.curriculum.min_k = tuple(config.curriculum.get("min_k", ()))
    config.data.prompt_buckets = tuple(config.data.prompt_buckets)
    config.mesh.shape = tuple(config.mesh.shape)
