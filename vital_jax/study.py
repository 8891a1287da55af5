"""Does training with vital_jax work? The paper's ablations at CPU scale on PhantomVQA, with floors beside them.

    python -m vital_jax.study --config=configs/study/phantom.py --workdir=DIR          # the full study
    python -m vital_jax.study --config=configs/study/phantom.py:quick --workdir=DIR    # minutes: a smoke run

Stages (each resumable: a rerun reuses what is finished and says so):
  1 data       PhantomVQA (configs/data/phantom_vqa.py settings, `config.data`): train / val / test from disjoint
               phantoms, closed answers balanced per question text, ROI features from a small SigLIP
               (`config.roi_encoder`: random weights, or pretrained on phantom patch labels by `vital_jax.pretrain`'s
               roi_encoder stage, `make_roi_encoder`).
  2 pretrain   `vital_jax.pretrain`: a small Qwen3-VL (all parameters) and Qwen3 decoder trained from random
               initialisation on phantom image-text data of other seeds, written as HF checkpoint directories.
  3 runs       every row x seed: `vital_jax.train.train` from the pretrained checkpoints (LoRA + scaffolding, the
               paper's recipe), then `vital_jax.evaluate` on the test split (benchmark `phantom_vqa`: yes/no and
               location choices closed-ended, the other types open-ended token F1, Appendix B.4), plus latent
               diagnostics (Appendix C.6's step-similarity matrix S, Eq. 9: the mean cosine of z_i and z_j over
               the first `eval.diagnostics_examples` test questions; and ours, not the paper's: ||z_k|| / mean
               token-embedding norm per step).
  4 report     report.md (mean +- std over seeds beside the chance and majority floors of the test split, per
               question type; the McNemar test of the key contrasts on paired test answers), figures, results.json.

Rows (ROWS): Table 2 (backbone without fine-tuning = lr 0; SFT without latent steps; task loss only with latent
steps; + L_text; + L_visual; full VITAL), Table 3 (K = 1..4 with the 3-phase curriculum and mixed without it) and
the pause control (learned constant slot inputs instead of fed-back z, same curriculum and supervision), and
MedSynapse-V's stages on the same data and backbone (MEDSYNAPSE_ROWS: Stage I; + CCR; + IMT, deployed without the
encoder), trained by `medsynapse.trainer` and evaluated by `evaluate.evaluate_medsynapse`.
Settings are chosen on the val split (`config.select_split`); the test split is only reported.

Runs: `config.parallel_runs` at a time, each in a spawned worker process with XLA on one thread and its output in
workdir/logs/<row>-seed<seed>.log (1: one after another in this process). Each study command appends its wall
clock to workdir/invocations.jsonl, which the report's cost section sums. `config.stop_after_minutes` (0: none)
runs the study in parts: no run starts after that many minutes, the runs in flight finish, and the same command
later continues (the report is written once every run is done).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import sys
import time
from typing import NamedTuple

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vital_jax import cli, compilation_cache
from vital_jax import workdir as workdir_lib
from vital_jax.checkpoint import CheckpointError
from vital_jax.data.questions import CLOSED_TYPES
from vital_jax.data.records import QUESTION_TYPES, LineError, iter_jsonl
from vital_jax.jsonio import append_json_line, atomic_write, read_json
from vital_jax.models.hf_config import ConfigError
from vital_jax.eval.floors import floors, question_types

_CONFIG = None
_WORKDIR = None
RESULTS_FILE, REPORT_FILE = "results.json", "report.md"
OPEN_TYPES = tuple(t for t in QUESTION_TYPES if t not in CLOSED_TYPES)  # in the report's column order


# ----------------------------------------------------------------------------------------------------- rows

def _mix(c):
    """No curriculum: one phase over every record for the curriculum's total epochs."""
    c.curriculum.max_k, c.curriculum.epochs, c.curriculum.min_k = (c.vital.k_max,), (sum(c.curriculum.epochs),), ()


def _row_backbone(c):
    c.optimizer.lr = 0.0  # LoRA B = 0: the pretrained backbone exactly
    c.vital.latent_steps_cap = 0
    # Nothing to learn: one step at lr 0 (AdamW's update and decay both scale with lr) writes the checkpoint.
    c.curriculum.max_k, c.curriculum.epochs, c.curriculum.min_k = (c.vital.k_max,), (1,), ()
    c.curriculum.max_steps = 1


def _row_sft_k0(c):
    c.vital.latent_steps_cap, c.vital.lambda_text, c.vital.lambda_visual = 0, 0.0, 0.0
    _mix(c)


def _row_text_only(c):
    _row_sft_k0(c)
    c.data.blind_images = True


def _row_task_only(c):
    c.vital.lambda_text, c.vital.lambda_visual = 0.0, 0.0


def _row_semantic(c):
    c.vital.lambda_visual = 0.0


def _row_visual(c):
    c.vital.lambda_text = 0.0


def _row_vital(c):
    del c


def _row_pause(c):
    c.vital.latent_input = "pause"


def _capped(k: int, curriculum: bool):
    def row(c):
        c.vital.latent_steps_cap = k
        if not curriculum:
            _mix(c)
    return row


# name -> (table, description, config edit, K used at evaluation (None: vital.k_max)); MEDSYNAPSE_ROWS below
ROWS = {
    "backbone": ("Table 2", "pretrained backbone, no fine-tuning (lr = 0)", _row_backbone, 0),
    "sft_k0": ("Table 2", "SFT without latent steps (K = 0, task loss only)", _row_sft_k0, 0),
    "task_only": ("Table 2", "latent steps, task loss only", _row_task_only, None),
    "semantic": ("Table 2", "latent steps, task + L_text", _row_semantic, None),
    "visual": ("Table 2", "latent steps, task + L_visual", _row_visual, None),
    "vital": ("Table 2", "full VITAL (task + L_text + L_visual), 3-phase curriculum", _row_vital, None),
    "pause": ("control", "pause slots: learned constant inputs, same curriculum and losses", _row_pause, None),
    "text_only": ("control", "text only: SFT (K = 0) with every image blanked, in training and evaluation",
                  _row_text_only, 0),
    # SFT and text-only again, stopped at the curriculum rows' number of optimizer steps (`match_curriculum_steps`
    # in the study config): Table 2 compares the latent rows, which train on the curriculum's fewer steps, with
    # these as well as with the longer-trained sft_k0.
    "sft_k0_matched": ("control", "sft_k0 stopped at the curriculum rows' optimizer steps", _row_sft_k0, 0),
    "text_only_matched": ("control", "text_only stopped at the curriculum rows' optimizer steps", _row_text_only,
                          0),
    **{f"k{k}": ("Table 3", f"VITAL, K capped at {k}, curriculum", _capped(k, True), k) for k in (1, 2, 3)},
    **{f"mix_k{k}": ("Table 3", f"VITAL, K capped at {k}, no curriculum", _capped(k, False), k) for k in (1, 2, 3, 4)},
}
SEED_INDEPENDENT = ("backbone",)  # nothing trains: one run stands for every seed

# MedSynapse-V beside VITAL (issue #15, item 9), on the same data: name -> (description, the last stage of the
# model evaluated, the memory branch answering). MedSynapse-V starts from an instruction-tuned VLM (the paper's
# Qwen3-VL-8B-Instruct already answers VQA; no stage of it teaches the backbone the task), so here its backbone is
# the same seed's sft_k0 model (LoRA merged, exported as HF): the rows are read against sft_k0, their starting
# point. One three-stage run per seed (runs/medsynapse/seed<s>) serves the three rows, each evaluating the model as
# it was when its stage finished (`trainer.load_trained(upto=...)`).
MEDSYNAPSE_ROWS = {
    "ms_warmup": ("MedSynapse-V Stage I (P_phi aligned) on sft_k0's model, answered with P_phi(E_ana(X))",
                  "warmup", "sampler"),
    "ms_ccr": ("MedSynapse-V + CCR (GRPO on LoRA), answered with P_phi(E_ana(X))", "ccr", "sampler"),
    "ms_imt": ("MedSynapse-V + IMT, deployed: A_psi on the VLM's own tokens, no encoder", "imt", "autonomous"),
}
# What each MedSynapse-V stage's learning curve shows (a logged metric of that stage): Stage I's answer NLL (its
# loss), CCR's mean reward R (its GRPO surrogate loss says little), IMT's mean JSD (its loss may add memory_match).
MEDSYNAPSE_CURVE_METRICS = {"warmup": "loss", "ccr": "reward_mean", "imt": "jsd"}
ALL_ROWS = (*ROWS, *MEDSYNAPSE_ROWS)
# The report's McNemar tests (a, b): what each method adds to the model it starts from, stage by stage.
PAIRED_TESTS = (("sft_k0", "text_only"), ("sft_k0_matched", "text_only_matched"), ("vital", "sft_k0"),
                ("vital", "sft_k0_matched"), ("vital", "pause"), ("vital", "task_only"), ("task_only", "sft_k0"),
                ("sft_k0", "backbone"), ("ms_warmup", "sft_k0"), ("ms_ccr", "ms_warmup"), ("ms_imt", "ms_ccr"),
                ("ms_imt", "sft_k0"))
# Does L_visual make the visual window point at the target? (a, b) differ in L_visual alone (`eval.grounding`'s
# McNemar tests on the records' step-1 pointing-game hits).
GROUNDING_PAIRS = (("visual", "task_only"), ("vital", "semantic"))
# The same contrasts on the answers at each question's own training K (a K = 0 row's answers are its own K's).
PAIRED_TESTS_RECORD_K = (("vital", "sft_k0"), ("vital", "sft_k0_matched"), ("pause", "sft_k0_matched"),
                         ("vital", "pause"), ("vital", "task_only"), ("task_only", "sft_k0"))


class StudyError(RuntimeError):
    """The study cannot go on; names the stage and the cause."""


# ----------------------------------------------------------------------------------------------- stages

def prepare_data(config, workdir: str) -> str:
    """Stage 1: PhantomVQA with ROI features in workdir/data (reused when complete)."""
    from vital_jax.data import build as build_lib
    from vital_jax.data.build_config import phantom_vqa_config
    from vital_jax.data.records import interrupted_roi_write, load_roi_arrays
    from vital_jax.data.roi import extract_dataset_rois

    data_dir = os.path.join(workdir, "data")
    encoder_dir = os.path.join(workdir, "roi_encoder")
    if os.path.exists(os.path.join(data_dir, "STUDY_READY")):
        logging.info("study: reusing PhantomVQA in %s", data_dir)
        return data_dir
    build_config = phantom_vqa_config()
    build_config.out_dir = data_dir
    build_config.seed = int(config.data.seed)
    build_config.phantoms.size = int(config.data.phantom_size)
    build_config.phantoms.split_counts = tuple(config.data.split_counts)
    build_config.phantoms.modalities = tuple(config.data.modalities)
    if interrupted_roi_write(data_dir):  # killed mid-rename: redone first, as the build refuses the folder
        extract_dataset_rois(data_dir, encoder_dir, batch_size=16)
    summary = build_lib.build(build_config)
    logging.info("study: PhantomVQA %s", summary["splits"])
    if not os.path.exists(os.path.join(encoder_dir, "config.json")):
        make_roi_encoder(config, workdir, encoder_dir)
    if load_roi_arrays(data_dir) is None:
        extract_dataset_rois(data_dir, encoder_dir, batch_size=16)
    atomic_write(os.path.join(data_dir, "STUDY_READY"), lambda f: json.dump(summary["splits"], f))
    return data_dir


ROI_ENCODERS = ("random", "pretrained")


def make_roi_encoder(config, workdir: str, encoder_dir: str) -> None:
    """The study's ROI encoder (the SigLIP of L_visual's targets and of the heatmaps; MedSynapse-V's E_ana) into
    `encoder_dir`: config.roi_encoder "random" (a tiny random SigLIP, `demo_assets.write_tiny_siglip`) or
    "pretrained" (`vital_jax.pretrain`'s roi_encoder stage with config.pretrain.roi_encoder, in
    workdir/roi_encoder_pretrain, resumable; its HF directory copied in whole)."""
    from vital_jax import demo_assets, pretrain

    if config.get("roi_encoder", "random") == "random":
        demo_assets.write_tiny_siglip(encoder_dir, seed=int(config.data.seed) + 2)
        return
    settings = ml_collections.ConfigDict(config.pretrain.to_dict())
    settings.stages = ("roi_encoder",)
    pre_dir = os.path.join(workdir, "roi_encoder_pretrain")
    summary = pretrain.pretrain(settings, pre_dir)
    if summary["preempted"]:
        raise StudyError(f"the ROI encoder's pretraining in {pre_dir} was interrupted; rerun the study to resume it")
    staging = encoder_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(summary["stages"]["roi_encoder"]["hf_dir"], staging)
    shutil.rmtree(encoder_dir, ignore_errors=True)  # none, or empty (no config.json)
    os.rename(staging, encoder_dir)


def prepare_backbone(config, workdir: str) -> dict:
    """Stage 2: the pretrained backbone and decoder (HF directories): `vital_jax.pretrain` with config.pretrain
    into workdir/pretrain, or (config.pretrained = "shipped") the pair that ships with vital_jax."""
    from vital_jax import assets, pretrain

    if config.pretrained == "shipped":
        return dict(assets.phantom_vlm(), summary=assets.phantom_vlm_provenance().get("summary", {}))
    if config.pretrained != "run":
        raise StudyError(f"config.pretrained={config.pretrained!r}: expected 'run' or 'shipped'")
    pre_dir = os.path.join(workdir, "pretrain")
    summary = pretrain.pretrain(config.pretrain, pre_dir)
    if summary["preempted"]:
        raise StudyError(f"pretraining in {pre_dir} was interrupted; rerun the study to resume it")
    return {"backbone_dir": pretrain.hf_dir(pre_dir, "backbone"), "decoder_dir": pretrain.hf_dir(pre_dir, "decoder"),
            "summary": summary}


def study_floors(config, data_dir: str) -> dict[str, dict]:
    """The floors of the test and select splits ({split: floors}), after checking that both hold closed-ended
    questions: the study's numbers (closed accuracy beside its floors, the McNemar tests, the settings chosen on the
    select split) are about them, so a split without any is refused before anything trains."""
    from vital_jax.data.records import SPLITS

    split_floors = {split: floors(data_dir, split) for split in dict.fromkeys((config.eval.test_split,
                                                                               config.select_split))}
    for split, floor in split_floors.items():
        if floor["closed"]["count"] == 0:
            questions = sum(f["count"] for t, f in floor.items() if t not in ("closed", "open"))
            raise StudyError(
                f"{data_dir}: split {split!r} has no closed-ended question (yes/no, location choice) among its "
                f"{questions} questions, and the study measures closed accuracy on it; give that split more "
                f"phantoms (config.data.split_counts={tuple(config.data.split_counts)}: "
                f"{', '.join(SPLITS)}) in a new --workdir")
    return split_floors


def run_config(config, row: str, seed: int, data_dir: str, models: dict) -> ml_collections.ConfigDict:
    """The training config of one run: configs/base.py + the study's `train` overrides + the row's edit."""
    from configs import base

    if row not in ROWS and row not in MEDSYNAPSE_ROWS:
        raise StudyError(f"unknown study row {row!r} (expected one of {', '.join(ALL_ROWS)})")
    c = base.get_config()
    c.update_from_flattened_dict({k: v for k, v in _flatten(config.train.to_dict()).items()})
    c.seed = int(seed)
    c.demo.enabled = False
    c.model.backbone_dir, c.model.decoder_dir = models["backbone_dir"], models["decoder_dir"]
    c.model.tokenizer_dir = models["backbone_dir"]
    c.data.data_dir = data_dir
    if row in MEDSYNAPSE_ROWS:
        c.method = "medsynapse"
        c.medsynapse = base.medsynapse_section()
        c.medsynapse.update_from_flattened_dict(_flatten(config.medsynapse.to_dict()))
        c.model.backbone_dir = c.model.tokenizer_dir = models["medsynapse_backbone_dir"]
        # E_ana: recorded in the run's config like the other paths, so `python -m vital_jax.train` can continue a
        # study's run from its recorded config (with the field empty it refused both ways: missing, then differing).
        c.model.roi_encoder_dir = models["encoder_dir"]
    else:
        ROWS[row][2](c)
        # Rows without the curriculum train one phase over every record; `epochs_without_curriculum` (0: the
        # curriculum's total) sets its epochs, and the rows in `match_curriculum_steps` stop after the curriculum
        # rows' number of optimizer steps.
        mixed = row != "backbone" and len(c.curriculum.max_k) == 1
        if mixed and config.get("epochs_without_curriculum"):
            c.curriculum.epochs = (int(config.epochs_without_curriculum),)
        if row in config.get("match_curriculum_steps", ()):
            c.curriculum.max_steps = curriculum_steps(config, data_dir, models)
    return c


def curriculum_steps(config, data_dir: str, models: dict) -> int:
    """Optimizer steps of a curriculum row (full VITAL's) on this data."""
    from vital_jax.train import phase_steps

    return sum(phase_steps(run_config(config, "vital", 0, data_dir, models), data_dir))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def score_by_type(predictions_path: str, types: dict[str, str]) -> dict:
    """Per question type: closed accuracy or open token F1 (mean), with counts; and the per-example closed
    correctness (id -> bool) for paired tests."""
    per_type = collections.defaultdict(list)
    closed_correct = {}
    with open(predictions_path) as f:
        for line in f:
            row = json.loads(line)
            qtype = types[row["id"]]
            if row["answer_type"] == "closed":
                per_type[qtype].append(float(bool(row["correct"])))
                closed_correct[row["id"]] = bool(row["correct"])
            else:
                per_type[qtype].append(float(row["f1"]))
    return {"per_type": {t: {"score": float(np.mean(v)), "count": len(v)} for t, v in per_type.items()},
            "closed_correct": closed_correct}


def latent_diagnostics(run, data_dir: str, split: str, k: int, limit: int) -> dict | None:
    """Appendix C.6 on `limit` examples of `split` at K = k: the mean step-similarity matrix S (K x K) and
    ||z_k|| / mean token-embedding norm per step. None at K = 0."""
    from vital_jax.eval.benchmarks import load_benchmark
    from vital_jax.inference import Predictor
    from vital_jax.vital import interpret

    if k == 0:
        return None
    examples = load_benchmark("phantom_vqa", data_dir, split=split, limit=limit)
    predictor = Predictor(run, batch_size=8, max_new_tokens=4)
    sims = interpret.StepSimilarity(k)
    ratios, counts = [], []
    for i in range(0, len(examples), 8):
        chunk = examples[i:i + 8]
        _, z, _ = predictor.answer([e.image for e in chunk], [e.prompt for e in chunk], k)
        z = z[:, :k]
        valid = np.ones(z.shape[:2], bool)
        sims.update(z, valid)
        ratio = interpret.norm_ratio(run.model, run.params, z, valid)
        ratios.append(np.asarray(ratio["ratio_per_step"]))
        counts.append(len(chunk))
    # Each batch's per-step mean weighs by its examples (a short last batch is not a full one).
    return {"step_similarity": sims.matrix().tolist(),
            "norm_ratio_per_step": np.average(ratios, axis=0, weights=counts).tolist()}


def run_dir_of(runs_dir: str, row: str, seed: int) -> str:
    """Where one (row, seed) run lives; its results.json there marks it finished."""
    return os.path.join(runs_dir, row, f"seed{seed}")


def _finished(runs_dir: str, row: str, seed: int) -> bool:
    return _saved_result(os.path.join(run_dir_of(runs_dir, row, seed), RESULTS_FILE)) is not None


def _saved_result(result_path: str) -> dict | None:
    """A run's results.json; None when it has none. An unreadable one (a damaged or truncated file) is moved aside
    to results.json.unreadable-<time>, with a warning, and the run counts as not finished: `run_one` then finds its
    training done in its checkpoints and evaluates it again."""
    if not os.path.exists(result_path):
        return None
    try:
        result = read_json(result_path, ValueError)
        if not isinstance(result, dict):
            raise ValueError(f"{result_path}: not a JSON object")
    except ValueError as e:
        aside = f"{result_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(result_path, aside)
        logging.warning("%s; moved it to %s: the run is evaluated again", e, aside)
        return None
    return result


def sft_backbone(config, seed: int, data_dir: str, models: dict, runs_dir: str, commit: str = "unknown") -> str:
    """The HF directory of this seed's sft_k0 model with its LoRA merged (MedSynapse-V's starting backbone),
    training sft_k0 first if the study has not."""
    from conversion import vital_export

    run_one(config, "sft_k0", seed, data_dir, models, runs_dir, commit)
    run_dir = run_dir_of(runs_dir, "sft_k0", seed)
    out_dir = os.path.join(run_dir, "export_hf")
    if not os.path.exists(os.path.join(out_dir, vital_export.VITAL_FILE)):  # written last by the export
        shutil.rmtree(out_dir, ignore_errors=True)   # an interrupted export of this study's own run
        vital_export.export_run(run_dir, out_dir)
    return out_dir


def run_one_medsynapse(config, row: str, seed: int, data_dir: str, models: dict, runs_dir: str,
                       commit: str = "unknown") -> dict:
    """Train (or reuse) this seed's three-stage MedSynapse-V run, then evaluate the model as it was when the row's
    stage finished, with the row's memory branch, on the test and select splits. E_ana is the study's SigLIP (the
    data stage's ROI encoder)."""
    from vital_jax.evaluate import evaluate_medsynapse
    from vital_jax.medsynapse import trainer

    backbone_dir = sft_backbone(config, seed, data_dir, models, runs_dir, commit)
    c = run_config(config, row, seed, data_dir, dict(models, medsynapse_backbone_dir=backbone_dir))
    run_dir = run_dir_of(runs_dir, "medsynapse", seed)
    _, upto, memory = MEDSYNAPSE_ROWS[row]
    c.medsynapse.stages = _stages_through(tuple(c.medsynapse.stages), upto, run_dir)
    paths = trainer.Paths(data_dir, backbone_dir, backbone_dir, models["encoder_dir"])
    start = time.perf_counter()
    summary = trainer.train(c, run_dir, paths)
    if summary.get("preempted"):
        raise StudyError(f"MedSynapse-V run {run_dir} was preempted; rerun the study to resume it")
    train_s = time.perf_counter() - start
    trained = trainer.load_trained(run_dir, upto=upto)
    start = time.perf_counter()
    evaluated = {}
    for name, split in {"test": config.eval.test_split, "select": config.select_split}.items():
        out_dir = os.path.join(run_dir_of(runs_dir, row, seed), f"eval_{split}")
        metrics = evaluate_medsynapse(run_dir, "phantom_vqa", data_dir, out_dir, [memory], split=split,
                                      batch_size=int(config.eval.batch_size), trained=trained,
                                      latency_examples=int(config.eval.latency_examples))[0]
        evaluated[name] = _split_scores(metrics, out_dir, data_dir)
    eval_s = time.perf_counter() - start
    samples = [s for s in _metric_lines(run_dir) if s.get("stage") == upto]
    curve_metric = MEDSYNAPSE_CURVE_METRICS[upto]
    return {"row": row, "seed": seed, "k_eval": 0, "memory": memory, "steps": trained.steps[upto],
            "train_s": train_s, "eval_s": eval_s, "samples_per_sec": _median_throughput(samples),
            "test": evaluated["test"], "select": evaluated["select"], "diagnostics": None,
            "curve": [(s["step"], s[curve_metric], None) for s in samples if curve_metric in s],
            "curve_metric": curve_metric}


def _stages_through(stages: tuple[str, ...], upto: str, run_dir: str) -> tuple[str, ...]:
    """The stages a MedSynapse-V row's `train` call runs: the configured ones up to the row's own, so that the
    call's time is what that stage cost (the stages before it are done and only restored; `_jobs` runs a seed's
    rows in stage order). A run recorded with more stages (made all at once, by an older study) keeps its list: a
    recorded list may only grow."""
    if upto not in stages:
        raise StudyError(f"a MedSynapse-V row needs stage {upto!r}; config.medsynapse.stages is {stages}")
    from vital_jax.medsynapse import trainer

    through = stages[:stages.index(upto) + 1]
    recorded = trainer.recorded_stages(run_dir) or ()
    if len(recorded) > len(through) and recorded[:len(through)] == through:
        return recorded
    return through


def run_one(config, row: str, seed: int, data_dir: str, models: dict, runs_dir: str,
            commit: str = "unknown") -> dict:
    """Train + evaluate one (row, seed), or return its saved result (results.json is written last). A new result
    records `commit` (the code it was made with)."""
    from vital_jax import train as train_lib
    from vital_jax.evaluate import evaluate
    from vital_jax.run import load_run

    run_dir = run_dir_of(runs_dir, row, seed)
    result_path = os.path.join(run_dir, RESULTS_FILE)
    result = _saved_result(result_path)
    if result is not None:
        if row in ROWS and result["k_eval"] > 0 and "test_record_k" not in result:  # written before that evaluation
            result["test_record_k"] = _evaluate_record_k(config, load_run(run_dir), run_dir, data_dir)
            _write_json(result_path, result)
        # Asked for later, or scored before the ROI feature's own hits were kept (the per-target table's row).
        if _wants_grounding(config, row, result["k_eval"]) and "roi_feature_hits" not in result.get("grounding", {}):
            result["grounding"] = _grounding(config, load_run(run_dir), data_dir)
            _write_json(result_path, result)
        result["reused"] = True
        return result
    if row in MEDSYNAPSE_ROWS:
        result = dict(run_one_medsynapse(config, row, seed, data_dir, models, runs_dir, commit), commit=commit)
        _write_json(result_path, result)
        result["reused"] = False
        return result
    c = run_config(config, row, seed, data_dir, models)
    start = time.perf_counter()
    summary = train_lib.train(c, run_dir)
    if summary.get("preempted"):
        raise StudyError(f"run {row}/seed{seed} was preempted; rerun the study to resume it")
    train_s = time.perf_counter() - start
    k_eval = ROWS[row][3] if ROWS[row][3] is not None else int(c.vital.k_max)
    run = load_run(run_dir)
    start = time.perf_counter()
    splits = {"test": config.eval.test_split, "select": config.select_split}
    evaluated = {}
    for name, split in splits.items():
        metrics = evaluate(run_dir, "phantom_vqa", data_dir, os.path.join(run_dir, f"eval_{split}"), [k_eval],
                           split=split, batch_size=int(config.eval.batch_size), run=run,
                           latency_examples=int(config.eval.latency_examples))[0]
        evaluated[name] = _split_scores(metrics, os.path.join(run_dir, f"eval_{split}"), data_dir)
    if k_eval > 0:
        evaluated["test_record_k"] = _evaluate_record_k(config, run, run_dir, data_dir, k_eval, evaluated["test"])
    if _wants_grounding(config, row, k_eval):
        evaluated["grounding"] = _grounding(config, run, data_dir)
    eval_s = time.perf_counter() - start
    diagnostics = latent_diagnostics(run, data_dir, config.eval.test_split, k_eval,
                                     int(config.eval.diagnostics_examples))
    samples = _metric_lines(run_dir)
    result = {"row": row, "seed": seed, "k_eval": k_eval, "steps": int(summary["step"]), "train_s": train_s,
              "eval_s": eval_s, "samples_per_sec": _median_throughput(samples), "commit": commit,
              "test": evaluated["test"], "select": evaluated["select"], "diagnostics": diagnostics,
              "curve": [(s["step"], s["loss"], s.get("task_loss")) for s in samples if "loss" in s]}
    for name in ("test_record_k", "grounding"):
        if name in evaluated:
            result[name] = evaluated[name]
    _write_json(result_path, result)
    result["reused"] = False
    return result


def _split_scores(metrics: dict, eval_dir: str, data_dir: str) -> dict:
    """One split's entry of a run's result: evaluate's closed accuracy beside its floor, open F1, mean latency,
    and the per-type scores of the predictions it wrote to eval_dir."""
    by_type = score_by_type(os.path.join(eval_dir, "phantom_vqa.predictions.jsonl"), question_types(data_dir))
    return {"closed_accuracy": metrics["closed_accuracy"],
            "closed_majority_baseline": metrics["closed_majority_baseline"],
            "open_token_f1": metrics.get("open_token_f1"),
            "latency_ms": (metrics.get("latency_ms") or {}).get("mean"), **by_type}


def _metric_lines(run_dir: str) -> list[dict]:
    """A run's logged metrics; a line that cannot be read (one a kill cut short) is skipped with a warning naming
    it, rather than failing the study's evaluation of a finished run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    for number, row in iter_jsonl(path):
        if isinstance(row, LineError):
            logging.warning("%s:%d: %s; skipped (the run's throughput and curve leave it out)", path, number, row)
        else:
            rows.append(row)
    return rows


def _median_throughput(samples: list[dict]) -> float | None:
    throughput = [s["perf/samples_per_sec"] for s in samples if "perf/samples_per_sec" in s]
    return float(np.median(throughput)) if throughput else None


def _evaluate_record_k(config, run, run_dir: str, data_dir: str, k_eval: int | None = None,
                       fixed_scores: dict | None = None) -> dict:
    """The test split answered with each question's own training K (`evaluate.RECORD_K`), beside the paper's fixed
    K: training gives a yes/no question (a 1-step chain) one latent step, and the paper's protocol then answers it
    with K_max; this evaluation tells that mismatch apart from a model that fails anyway.

    When every question's capped K is `k_eval` (a cap of 1: every chain has at least one step) the two
    evaluations are the same computation, so `fixed_scores` (the fixed-K test scores) are returned instead."""
    from vital_jax.evaluate import RECORD_K, evaluate, load_examples, record_latent_steps

    if fixed_scores is not None:
        _, examples = load_examples("phantom_vqa", data_dir, config.eval.test_split, None, "auto")
        if set(record_latent_steps(examples, run.config)) == {k_eval}:
            keep = ("closed_accuracy", "open_token_f1", "per_type", "closed_correct")
            return {**{k: fixed_scores[k] for k in keep}, "same_as_fixed_k": True}
    out_dir = os.path.join(run_dir, "eval_test_record_k")
    metrics = evaluate(run_dir, "phantom_vqa", data_dir, out_dir, [RECORD_K], split=config.eval.test_split,
                       batch_size=int(config.eval.batch_size), run=run, latency_examples=1)[0]
    by_type = score_by_type(os.path.join(out_dir, "phantom_vqa.predictions.jsonl"), question_types(data_dir))
    return {"closed_accuracy": metrics["closed_accuracy"], "open_token_f1": metrics.get("open_token_f1"), **by_type}


def _wants_grounding(config, row: str, k_eval: int) -> bool:
    """config.eval.grounding, for the rows that train latent steps (a K = 0 row has no heatmap)."""
    return bool(config.eval.get("grounding", False)) and row in ROWS and k_eval > 0


def _grounding(config, run, data_dir: str) -> dict:
    """`explain.grounding` on the test split at K_max (the ROI encoder of the run's config, the study's): per step
    the pointing game and inside - outside cosine, chance, the ROI feature's own scores, and step 1's hit per
    record (`step1_hits`, for the report's paired tests; the other steps' hits are left out of results.json), and
    the ROI feature's own hit per record (`roi_feature_hits`, None without ROI features: the per-target table's
    reference row; the same in every run of a study)."""
    from vital_jax.explain import grounding

    scores = grounding(run, data_dir, config.eval.test_split, batch_size=int(config.eval.batch_size))
    summary = lambda s: {k: v for k, v in s.items() if k != "hits"}  # noqa: E731
    return {"chance": scores["chance"], "grid": scores["grid"], "records": scores["records"],
            "steps": [summary(s) for s in scores["steps"]],
            "roi_feature": summary(scores["roi_feature"]) if scores["roi_feature"] else None,
            "step1_hits": scores["steps"][0]["hits"],
            "roi_feature_hits": scores["roi_feature"]["hits"] if scores["roi_feature"] else None}


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f))


# -------------------------------------------------------------------------------------------------- report

def mcnemar(a: dict[str, bool], b: dict[str, bool], clusters: dict[str, str] | None = None) -> dict:
    """Exact two-sided McNemar test on paired answers (ids in both; a_only = a right & b wrong, b_only = the
    reverse), over `clusters` (id -> its cluster: answers about one image are not independent; None: each id its own
    cluster). Each cluster's difference d = its a_only - b_only; under the null the two rows are exchangeable within
    a cluster, so each d's sign is a fair coin and p = P(|sum of +-d| >= |sum of d|), counted exactly over the
    sign patterns. With one id per cluster this is the exact binomial McNemar test. a_ahead / b_ahead: clusters
    whose d is positive / negative."""
    ids = sorted(set(a) & set(b))
    unplaced = [i for i in ids if clusters is not None and i not in clusters]
    if unplaced:
        raise ValueError(f"McNemar test: {len(unplaced)} answers have no unit (first: {unplaced[:3]})")
    by_cluster = collections.Counter()
    for i in ids:
        by_cluster[clusters[i] if clusters is not None else i] += int(a[i]) - int(b[i])
    differences = [d for d in by_cluster.values() if d]
    # Number of sign patterns reaching each sum, built one cluster at a time (integers: exact).
    patterns = {0: 1}
    for d in differences:
        step = collections.Counter()
        for total, count in patterns.items():
            step[total + d] += count
            step[total - d] += count
        patterns = step
    observed = abs(sum(differences))
    extreme = sum(count for total, count in patterns.items() if abs(total) >= observed)
    return {"a_only": sum(a[i] and not b[i] for i in ids), "b_only": sum(b[i] and not a[i] for i in ids),
            "a_ahead": sum(d > 0 for d in differences), "b_ahead": sum(d < 0 for d in differences),
            "p": min(1.0, extreme / 2 ** len(differences))}


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (same order): the family of a report table's tests controlled at its level."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _paired_lines(by_row: dict, pairs, answers, clusters: dict[str, str] | None) -> list[str]:
    """One line of `mcnemar` over `clusters` per pair and seed both rows ran (a row run once, the lr = 0 backbone,
    pairs with every seed), with Holm-adjusted p over all the table's lines. `answers(result)`: its {id: right}."""
    tests = []
    for a, b in pairs:
        if a not in by_row or b not in by_row:
            continue
        runs_b = {r["seed"]: r for r in by_row[b]}
        for run_a in by_row[a]:
            run_b = runs_b.get(run_a["seed"]) or (by_row[b][0] if len(by_row[b]) == 1 else None)
            if run_b is not None:
                tests.append((a, b, run_a["seed"], mcnemar(answers(run_a), answers(run_b), clusters)))
    adjusted = holm([t["p"] for *_, t in tests])
    return [f"| {a} | {b} | {seed} | {t['a_only']} | {t['b_only']} | {t['a_ahead']} | {t['b_ahead']} | "
            f"{t['p']:.3g} | {q:.3g} |" for (a, b, seed, t), q in zip(tests, adjusted)]


def _paired_header(right: str, unit: str) -> list[str]:
    """The column names of `_paired_lines`' table: `right` what a row gets right, `unit` the clusters' name."""
    return [f"| a | b | seed | a {right}, b not | b {right}, a not | {unit} where a is ahead | where b is | p "
            "| p (Holm) |", "|---|---|---|---|---|---|---|---|---|"]


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def aggregate(results: list[dict]) -> dict[str, list[dict]]:
    by_row = collections.defaultdict(list)
    for r in results:
        by_row[r["row"]].append(r)
    return by_row


def write_report(workdir: str, config, results: list[dict], floor: dict, pretrain_summary: dict,
                 provenance: dict, select_floor: dict | None = None,
                 test_records: dict[str, TestRecord] | None = None) -> str:
    """report.md + figures under workdir/report/; returns the report's path. `floor`: the test split's floors
    (`eval.floors.floors`), `select_floor` the select split's (its table's floor row; none when not given),
    `test_records` each test record's image, mask and target (`_test_records`): the paired tests' units, the
    image for answers and the (image, mask) pair for grounding (None: each record its own unit, said in the
    report)."""
    from vital_jax.eval import study_plots

    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    by_row = aggregate(results)
    types = [t for t in CLOSED_TYPES + OPEN_TYPES if t in floor]
    lines = ["# PhantomVQA learning study", "",
             f"Command: `{provenance['command']}`  ", f"Commit: `{provenance['commit']}`  ",
             *_earlier_commits(results, provenance["commit"]),
             f"Seeds: {', '.join(str(s) for s in config.seeds)}; test split: `{config.eval.test_split}` "
             f"({floor['closed']['count']} closed questions); settings chosen on `{config.select_split}`.  ",
             _roi_encoder_line(config, workdir), "",
             "Closed: accuracy (%) on yes/no and location-choice questions; open: token F1 (%), Appendix B.4. "
             "Mean ± std over seeds (the std is the seeds' spread only: with "
             f"{floor['closed']['count']} closed test questions, a closed accuracy near 50 % has a sampling "
             f"standard error of ~{100 * math.sqrt(0.25 / max(1, floor['closed']['count'])):.1f} points of its "
             "own). Updates: optimizer steps of the row's runs.", "",
             "| row | what | K | updates | closed acc | " + " | ".join(types) + " | open F1 |",
             "|---|---|---|---|---|" + "---|" * len(types) + "---|"]
    floor_cells = [f"{100 * _closed_floor(floor[t]):.1f}" if "majority" in floor[t]
                   else f"{100 * floor[t]['majority_f1']:.1f}" for t in types]
    open_floor = f"{100 * floor['open']['majority_f1']:.1f}" if "open" in floor else "–"
    lines.append(f"| *floor* | the strongest floor without the image (closed: chance or a majority answer, "
                 f"below; open: the most frequent answer) | – | – | {100 * floor['closed']['strongest']:.1f} | "
                 + " | ".join(floor_cells) + f" | {open_floor} |")
    for row in ALL_ROWS:
        if row not in by_row:
            continue
        rs = by_row[row]
        cells = [_mean_std([r["test"]["per_type"].get(t, {}).get("score") for r in rs]) for t in types]
        what, k = (ROWS[row][1], rs[0]["k_eval"]) if row in ROWS else (MEDSYNAPSE_ROWS[row][0], "–")
        lines.append(f"| {row} | {what} | {k} | {rs[0]['steps']} | "
                     f"{_mean_std([r['test']['closed_accuracy'] for r in rs])} | " + " | ".join(cells) + " | "
                     f"{_mean_std([r['test']['open_token_f1'] for r in rs])} |")
    lines += ["", "## Floors (test split)", "",
              "What a model scores without the image: chance (1 / options), the majority answer of all closed "
              "questions, of each question type, and of each option set (a location choice between left / center "
              "/ right answered by those questions' most frequent answer); the open types' most frequent answer.",
              "", "| question type | n | chance | majority | majority per type | majority per option set | "
              "most frequent answer (F1) |", "|---|---|---|---|---|---|---|"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for t in [*types, "closed", "open"]:
        if t in floor:
            f = floor[t]
            lines.append(f"| {t} | {f['count']} | {pct(f.get('chance'))} | {pct(f.get('majority'))} | "
                         f"{pct(f.get('majority_by_type'))} | {pct(f.get('majority_by_options'))} | "
                         f"{pct(f.get('majority_f1'))} |")
    record_rows = [row for row in ROWS if row in by_row and all("test_record_k" in r for r in by_row[row])]
    if record_rows:
        lines += ["", "## Each question answered at its own training K (diagnostic)", "",
                  "The table above follows the paper: every question gets the same K (K_max, or the row's cap). "
                  "Training gives each record the K of its reasoning chain (" + _step_ranges() + "; Appendix "
                  "A.2), so a fixed K_max asks short-chain questions "
                  "with a number of latent steps they never saw. Here each test question gets its own record's K "
                  "(capped like training).", "",
                  "| row | closed acc | " + " | ".join(types) + " | open F1 |",
                  "|---|---|" + "---|" * len(types) + "---|"]
        for row in record_rows:
            rs = [r["test_record_k"] for r in by_row[row]]
            cells = [_mean_std([r["per_type"].get(t, {}).get("score") for r in rs]) for t in types]
            same = " (= fixed K: a cap of 1)" if all(r.get("same_as_fixed_k") for r in rs) else ""
            lines.append(f"| {row}{same} | {_mean_std([r['closed_accuracy'] for r in rs])} | " + " | ".join(cells)
                         + f" | {_mean_std([r['open_token_f1'] for r in rs])} |")
    images = {i: r.image for i, r in test_records.items()} if test_records is not None else None
    closed_ids = {i for rs in by_row.values() for r in rs for i in r["test"].get("closed_correct", {})}
    unit = (f"image: the {len({images[i] for i in closed_ids if i in images})} test images hold the "
            f"{len(closed_ids)} closed questions, and questions about one image are not independent (one view of "
            "the image answers them all)" if images is not None else "question (each question its own unit: the "
            "test records were not given, so read p as optimistic where questions share an image)")
    header = _paired_header("right", "images" if images is not None else "questions")
    lines += ["", "## Paired tests (exact McNemar over images, closed test answers, each seed; the row's fixed K)",
              "", f"Unit: the {unit}. Each unit's difference (questions a answers right and b not, minus the "
              "reverse) keeps or flips its sign with probability 1/2 under the null, and p counts the sign "
              "patterns exactly (with one question per unit this is McNemar's exact binomial test). Two-sided; "
              "Holm's adjustment over the table's lines.", "", *header,
              *_paired_lines(by_row, PAIRED_TESTS, lambda r: r["test"]["closed_correct"], images)]
    record_k = _paired_lines(by_row, PAIRED_TESTS_RECORD_K,
                             lambda r: r.get("test_record_k", r["test"])["closed_correct"], images)
    if record_k:
        lines += ["", "## Paired tests at each question's own training K", "",
                  "The same test on the answers of the diagnostic table above (a K = 0 row answers at its own K).",
                  "", *header, *record_k]
    lines += _grounding_lines(by_row, test_records)
    lines += ["", "## Validation split (for choosing settings)", ""]
    if select_floor is not None:
        lines += [f"{select_floor['closed']['count']} closed questions (a closed accuracy near 50 % has a sampling "
                  f"standard error of ~{100 * math.sqrt(0.25 / max(1, select_floor['closed']['count'])):.0f} "
                  "points); the floor row as in the first table, from this split.", ""]
    lines += ["| row | closed acc | open F1 |", "|---|---|---|"]
    if select_floor is not None:
        open_select = f"{100 * select_floor['open']['majority_f1']:.1f}" if "open" in select_floor else "–"
        lines.append(f"| *floor* | {100 * select_floor['closed']['strongest']:.1f} | {open_select} |")
    for row in ALL_ROWS:
        if row in by_row:
            rs = by_row[row]
            lines.append(f"| {row} | {_mean_std([r['select']['closed_accuracy'] for r in rs])} | "
                         f"{_mean_std([r['select']['open_token_f1'] for r in rs])} |")
    figures = study_plots.write_figures(out_dir, by_row, floor)
    # A figure an earlier report drew and this one does not (another variant's rows, in the same workdir) would
    # sit beside this report as if it belonged to it.
    drawn = {os.path.basename(path) for path in figures.values()}
    for name in os.listdir(out_dir):
        if name.endswith(".png") and name not in drawn:
            os.remove(os.path.join(out_dir, name))
    lines += ["", "## Figures", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in figures.items()]
    lines += ["", "## Cost on this machine", "",
              f"Pretraining: {_pretrain_line(pretrain_summary)}", "",
              "| row | runs | train s (mean) | eval s (mean) | samples/s (median) | optimizer steps |",
              "|---|---|---|---|---|---|"]
    for row in ALL_ROWS:
        if row in by_row:
            rs = by_row[row]
            sps = [r["samples_per_sec"] for r in rs if r.get("samples_per_sec")]
            lines.append(f"| {row} | {len(rs)} | {np.mean([r['train_s'] for r in rs]):.0f} | "
                         f"{np.mean([r['eval_s'] for r in rs]):.0f} | "
                         f"{f'{np.median(sps):.1f}' if sps else '–'} | {rs[0]['steps']} |")
    if any(row in by_row for row in MEDSYNAPSE_ROWS):
        lines += ["", "MedSynapse-V rows share one run per seed: a row's train time, samples/s and steps are its own "
                  "stage's (the stages before it are in their rows; runs made before 2026-12-06 billed the whole "
                  "chain to the first row trained)."]
    total_s = sum(r["train_s"] + r["eval_s"] for r in results)
    lines += ["", f"All {len(results)} runs: {total_s / 60:.0f} min of training and evaluation (the sum of the "
              "times above, as measured when each run was made, side by side when the study ran runs in parallel; "
              "data preparation and pretraining not included)."]
    invocations = [i for i in _invocations(workdir) if i["runs_made"]]
    if invocations:
        wall = sum(i["wall_s"] for i in invocations)
        lines += ["", f"Wall clock: {wall / 60:.0f} min over {len(invocations)} study command(s) that made runs ("
                  + "; ".join(f"{i['runs_made']} runs in {i['wall_s'] / 60:.0f} min{_other_rows(i, by_row)}, "
                              f"{i['parallel_runs']} at a time, commit {i['commit'][:7]}" for i in invocations)
                  + "), data preparation included."]
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


class TestRecord(NamedTuple):
    """What the report needs of a test record: its image and mask (the paired tests' units) and its target."""
    image: str
    mask: str
    target: str


def _test_records(data_dir: str, split: str) -> dict[str, TestRecord]:
    """Record id -> its TestRecord, for the split's records."""
    from vital_jax.data.records import RECORDS_FILE, read_records

    return {r.id: TestRecord(r.image, r.mask, r.target) for r in read_records(os.path.join(data_dir, RECORDS_FILE))
            if r.split == split}


def _grounding_lines(by_row: dict, test_records: dict[str, TestRecord] | None = None) -> list[str]:
    """The report's grounding section (`eval.grounding`): per row the pointing game of each step's heatmap
    cos(VP(z_k), patches) on the test split, beside chance and the L_visual target itself, and McNemar tests of
    step 1's hits between rows that differ in L_visual alone (GROUNDING_PAIRS), over (image, mask) pairs
    (`test_records`: the questions about one target of one image share its mask and mostly its heatmap, so their
    hits are not independent; None: each record its own unit, said in the report), and step 1's pointing per
    target (with `test_records`). [] when no run was scored."""
    scored = {row: [r for r in rs if r.get("grounding")] for row, rs in by_row.items()}
    scored = {row: rs for row, rs in scored.items() if rs}
    if not scored:
        return []
    first = next(iter(scored.values()))[0]["grounding"]
    steps = max(len(r["grounding"]["steps"]) for rs in scored.values() for r in rs)
    roi = [r["grounding"]["roi_feature"]["pointing"] for rs in scored.values() for r in rs
           if r["grounding"].get("roi_feature")]
    target = (f"; the record's own ROI feature (the L_visual target) in place of VP(z_k): {100 * np.mean(roi):.1f} %"
              if roi else "")
    lines = ["", "## Does the visual window point at the target? (test split, the rows' K_max)", "",
             f"Pointing game: the share of records whose heatmap cos(VP(z_k), ROI-encoder patches) on the "
             f"{first['grid']} x {first['grid']} grid peaks inside the record's mask (step k over the records "
             f"trained with at least k steps; `explain --grounding`). Chance (a random cell): "
             f"{100 * first['chance']:.1f} %{target}.", "",
             "| row | L_visual | z1 per seed | " + " | ".join(f"z{k + 1}" for k in range(steps))
             + " | z1 inside - outside cosine |", "|---|---|---|" + "---|" * steps + "---|"]
    for row in ALL_ROWS:
        if row not in scored:
            continue
        rs = sorted(scored[row], key=lambda r: r["seed"])
        per_step = [_mean_std([r["grounding"]["steps"][k]["pointing"] for r in rs
                               if len(r["grounding"]["steps"]) > k]) for k in range(steps)]
        contrast = [r["grounding"]["steps"][0]["contrast"] for r in rs
                    if r["grounding"]["steps"][0]["contrast"] is not None]
        seeds = " / ".join(f"{100 * r['grounding']['steps'][0]['pointing']:.1f}" for r in rs)
        lines.append(f"| {row} | {'yes' if _trains_visual(row) else 'no'} | {seeds} | " + " | ".join(per_step)
                     + (f" | {np.mean(contrast):+.3f} |" if contrast else " | – |"))
    units = ({i: f"{r.image} | {r.mask}" for i, r in test_records.items()} if test_records is not None
             else None)
    paired = _paired_lines(scored, GROUNDING_PAIRS, lambda r: r["grounding"]["step1_hits"], units)
    if paired:
        unit = (f"(image, mask) pair: the {len(set(units.values()))} pairs hold the {len(units)} records, and the "
                "records of one pair are not independent" if units is not None else "record (each record its own "
                "unit: their images were not given, so read p as optimistic where records share an image and mask)")
        lines += ["", f"A row with L_visual against the same row without it, step 1's hits; unit: the {unit}. Exact "
                  "two-sided McNemar test over the units, as for the answers above, each seed; Holm over these "
                  "lines.", "", *_paired_header("hits", "pairs" if units is not None else "records"), *paired]
    if test_records is not None:
        lines += _pointing_by_target(scored, test_records)
    return lines


def _pointing_by_target(scored: dict, test_records: dict[str, TestRecord]) -> list[str]:
    """Step 1's pointing game per target of the scored rows (mean ± std over seeds), each target's records
    counted, and the records' own ROI features' (a run's `roi_feature_hits`): whether a row's pointing comes from
    the large organs or reaches the small lesions too, and how far its target itself would."""
    scored_ids = set().union(*(r["grounding"]["step1_hits"] for rs in scored.values() for r in rs))
    counts = collections.Counter(test_records[i].target for i in scored_ids)
    targets = sorted(counts, key=lambda t: (-counts[t], t))
    lines = ["", "Step 1's pointing by target (mean ± std over seeds; each target's records in the header):", "",
             "| row | " + " | ".join(f"{t} ({counts[t]})" for t in targets) + " |", "|---|" + "---|" * len(targets)]

    def share_by_target(hits: dict[str, bool]) -> dict[str, float]:
        grouped = collections.defaultdict(list)
        for i, hit in hits.items():
            grouped[test_records[i].target].append(hit)
        return {t: float(np.mean(values)) for t, values in grouped.items()}

    for row in ALL_ROWS:
        if row in scored:
            shares = [share_by_target(r["grounding"]["step1_hits"]) for r in scored[row]]
            lines.append(f"| {row} | " + " | ".join(_mean_std([s[t] for s in shares if t in s]) for t in targets)
                         + " |")
    roi_hits = next((r["grounding"]["roi_feature_hits"] for rs in scored.values() for r in rs
                     if r["grounding"].get("roi_feature_hits")), None)
    if roi_hits:
        target_shares = share_by_target(roi_hits)
        lines.append("| the record's ROI feature itself (the L_visual target) | " + " | ".join(
            f"{100 * target_shares[t]:.1f}" if t in target_shares else "–" for t in targets) + " |")
    return lines


def _trains_visual(row: str) -> bool:
    """Whether a row's runs train with L_visual (its edit of configs/base.py leaves lambda_visual > 0)."""
    from configs import base

    config = base.get_config()
    ROWS[row][2](config)
    return float(config.vital.lambda_visual) > 0


def _other_rows(invocation: dict, by_row: dict) -> str:
    """' (N of them of rows not in this report)' for a study command that also made another variant's runs in
    the workdir (its logged `made` list; commands logged before it was added say nothing), else ''."""
    other = [run for run in invocation.get("made", ()) if run.split("/")[0] not in by_row]
    return f" ({len(other)} of them of rows not in this report)" if other else ""


def _closed_floor(type_floor: dict) -> float:
    """A closed question type's strongest floor: chance, its majority answer or its option sets' majorities."""
    return max(type_floor["chance"], type_floor["majority"], type_floor.get("majority_by_options", 0.0))


def _earlier_commits(results: list[dict], commit: str) -> list[str]:
    """A report line naming the commits of reused runs made with other code (none when all match)."""
    counts = collections.Counter(r.get("commit", "unknown (made before runs recorded one)") for r in results)
    counts.pop(commit, None)
    if not counts:
        return []
    return ["Reused runs made at other commits: " + ", ".join(f"`{c}` ({n})" for c, n in counts.items()) + "  "]


def _step_ranges() -> str:
    from vital_jax.data.records import STEP_RANGES

    return ", ".join(f"{t} {lo}" + (f"-{hi}" if hi != lo else "") for t, (lo, hi) in STEP_RANGES.items())


def _roi_encoder_line(config, workdir: str) -> str:
    """Which ROI encoder the study's L_visual targets, heatmaps and MedSynapse-V's E_ana came from."""
    what = "ROI encoder (L_visual's targets, the heatmaps, MedSynapse-V's E_ana): "
    if config.get("roi_encoder", "random") == "random":
        return what + "a tiny SigLIP with random weights."
    path = os.path.join(workdir, "roi_encoder_pretrain", "pretrain_summary.json")
    stage = (read_json(path, StudyError).get("stages", {}).get("roi_encoder") if os.path.exists(path) else None)
    trained = ("(no summary)" if not stage else  # its HF directory's path left out, as the workdir's is
               f"{stage['steps']} steps, train loss {stage['initial_train_loss']:.3f} -> "
               f"{stage['final_train_loss']:.3f}, val loss {stage['final_val_loss']:.3f}, "
               f"{stage['train_seconds']:.0f} s")
    return what + f"a tiny SigLIP pretrained on phantom patch labels (`pretrain`'s roi_encoder stage): {trained}."


def _pretrain_line(summary: dict) -> str:
    from vital_jax import pretrain

    if not summary or not summary.get("stages"):
        return "(no summary)"
    seconds = {name: s.get("train_seconds") for name, s in summary["stages"].items()}
    return pretrain.format_summary(summary).replace("\n", "; ") + "; seconds: " + ", ".join(
        f"{name} {v:.0f}" for name, v in seconds.items() if v is not None)


def _provenance(command: str) -> dict:
    """{"command", "commit"}: the commit is HEAD, marked when tracked files had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    if commit and dirty:
        commit += " (with uncommitted changes)"
    return {"command": command, "commit": commit or "unknown"}


def command_line(argv: list[str]) -> str:
    """The study's command as given (argv without the program), its --workdir shown as DIR."""
    args = ["--workdir=DIR" if a.startswith("--workdir=") else a for a in argv]
    return " ".join(["python -m vital_jax.study"] + args)


def study(config, workdir: str, command: str = "python -m vital_jax.study --config=configs/study/phantom.py "
                                                "--workdir=DIR") -> dict:
    """Run (or resume) the whole study; returns {"results", "floors", "report", "reused"}. `command` is shown in
    the report; each run made now records the commit it was made at."""
    workdir = workdir_lib.local_workdir(workdir)
    unknown = [r for r in config.rows if r not in ALL_ROWS]
    if unknown:
        raise StudyError(f"config.rows: unknown {unknown} (expected some of {', '.join(ALL_ROWS)})")
    if not config.seeds:
        raise StudyError("config.seeds is empty")
    # Rows and seeds may grow (finished runs are reused); the MedSynapse-V settings may be added to a study
    # recorded before it had those rows.
    # The compilation cache changes no number, so a workdir may be resumed with it on or off; how many runs
    # train at once is the machine's business too. eval.grounding only adds a score to finished runs.
    # One study at a time in a workdir: two would build the same data, encoder and runs at once (each run's own
    # workdir under runs/ has its own lock).
    if config.get("roi_encoder", "random") not in ROI_ENCODERS:
        raise StudyError(f"config.roi_encoder={config.roi_encoder!r}: expected one of {', '.join(ROI_ENCODERS)}")
    with workdir_lib.WorkdirLock(workdir):
        _check_matched_rows(config, workdir)
        _check_roi_encoder(config, workdir)
        # roi_encoder and the pretraining recipe's roi_encoder section came later than some recorded studies
        # (whose encoder was the random one: `_check_roi_encoder`).
        workdir_lib.check_workdir_config(workdir, json.loads(config.to_json_best_effort()),
                                         extendable=("rows", "seeds", "compilation_cache", "parallel_runs",
                                                     "stop_after_minutes", "match_curriculum_steps",
                                                     "eval.grounding"),
                                         new_sections=("medsynapse", "roi_encoder", "pretrain.roi_encoder"))
        with _compilation_cache(config, workdir):
            return _study(config, workdir, _provenance(command))


def _check_matched_rows(config, workdir: str) -> None:
    """`match_curriculum_steps` may gain or lose rows (a study grows by new controls) only where no run of that
    row was made yet: a finished run is reused as it is, so it would stand for a budget it did not train with."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path):
        return
    recorded_config = read_json(path, StudyError)
    recorded = set(recorded_config.get("match_curriculum_steps", ()))
    wanted = list(config.get("match_curriculum_steps", ()))
    changed = recorded.symmetric_difference(wanted)
    if not changed:
        return
    runs_dir = os.path.join(workdir, "runs")
    made = sorted(row for row in changed if os.path.isdir(os.path.join(runs_dir, row)))
    if made:
        budget = "the curriculum rows'" if made[0] in recorded else "their own"
        raise StudyError(f"config.match_curriculum_steps adds or drops {made}, whose runs in {runs_dir} were made "
                         f"with {budget} number of steps (recorded: {sorted(recorded)}); use a new --workdir or "
                         f"keep the recorded list for those rows")
    # Recorded now, before any run of those rows: the runs made next bind the list as any recorded field does.
    recorded_config["match_curriculum_steps"] = wanted
    atomic_write(path, lambda f: json.dump(recorded_config, f, indent=2, sort_keys=True))


def _check_roi_encoder(config, workdir: str) -> None:
    """A study recorded before config.roi_encoder existed made the random encoder; it may go on only with that."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path) or "roi_encoder" in read_json(path, StudyError):
        return
    if config.get("roi_encoder", "random") != "random":
        raise StudyError(f"{workdir} was made with the random ROI encoder (recorded before config.roi_encoder); "
                         f"config.roi_encoder={config.roi_encoder!r} needs a new --workdir")


def _compilation_cache(config, workdir: str):
    """JAX's persistent cache in workdir/xla_cache when config.compilation_cache (shared by the worker processes)."""
    if config.get("compilation_cache"):
        return compilation_cache.persistent(os.path.join(workdir, "xla_cache"))
    return contextlib.nullcontext()


def _study(config, workdir: str, provenance: dict) -> dict:
    started = time.perf_counter()
    data_dir = prepare_data(config, workdir)
    split_floors = study_floors(config, data_dir)
    floor = split_floors[config.eval.test_split]
    # E_ana of the MedSynapse-V rows: the study's SigLIP (the data stage's ROI encoder).
    models = dict(prepare_backbone(config, workdir), encoder_dir=os.path.join(workdir, "roi_encoder"))
    runs_dir = os.path.join(workdir, "runs")
    plan = [(row, seed) for row in config.rows for seed in (config.seeds[:1] if row in SEED_INDEPENDENT
                                                             else config.seeds)]
    done: dict[tuple[str, int], dict] = {}

    def report_run(result: dict, seconds: float) -> None:
        done[(result["row"], result["seed"])] = result
        what = "reused" if result["reused"] else f"{seconds:.0f} s"
        # The select split's number: what settings are chosen by (the test split's is the report's, read once).
        print(f"study run {len(done)}/{len(plan)}: {result['row']} seed {result['seed']} ({what}): closed acc on "
              f"{config.select_split} {100 * result['select']['closed_accuracy']:.1f}%", flush=True)

    parallel = int(config.get("parallel_runs", 1))
    minutes = float(config.get("stop_after_minutes", 0))
    if minutes < 0:
        raise StudyError(f"config.stop_after_minutes must be >= 0 (0: no limit), got {minutes}")

    def may_start() -> bool:  # a new run starts only before the time limit; runs in flight finish
        return not minutes or time.perf_counter() - started < 60 * minutes

    if parallel > 1:
        _run_parallel(config, workdir, plan, data_dir, models, runs_dir, provenance["commit"], parallel, report_run,
                      may_start)
    else:
        for row, seed in plan:
            if not (may_start() or _finished(runs_dir, row, seed)):
                continue
            start = time.perf_counter()
            report_run(run_one(config, row, seed, data_dir, models, runs_dir, provenance["commit"]),
                       time.perf_counter() - start)
    _log_invocation(workdir, provenance["commit"], parallel,
                    [f"{r['row']}/seed{r['seed']}" for r in done.values() if not r["reused"]],
                    time.perf_counter() - started)
    left = [f"{row}/seed{seed}" for row, seed in plan if (row, seed) not in done]
    if left:
        print(f"study: stopped at the time limit (stop_after_minutes={minutes:g}) with {len(left)} of {len(plan)} "
              f"runs left; the same command continues", flush=True)
        return {"results": list(done.values()), "floors": floor, "report": None, "left": left,
                "reused": [f"{r['row']}/seed{r['seed']}" for r in done.values() if r["reused"]]}
    results = [done[key] for key in plan]
    report = write_report(workdir, config, results, floor, models["summary"], provenance,
                          select_floor=split_floors[config.select_split],
                          test_records=_test_records(data_dir, config.eval.test_split))
    atomic_write(os.path.join(workdir, RESULTS_FILE),
                 lambda f: json.dump({"floors": floor, "results": results}, f))
    reused = [f"{r['row']}/seed{r['seed']}" for r in results if r["reused"]]
    return {"results": results, "floors": floor, "report": report, "reused": reused, "left": []}


# -------------------------------------------------------------------------------------- runs side by side

# Each worker runs XLA on one thread. At the study's sizes a train step is many small ops: with XLA's Eigen thread
# pool a run keeps only ~1.2 of 2 cores busy, and on one thread it is no slower, so two runs at once finish sooner
# (sft_k0 + vital, 200 steps each with compiles: 193 s side by side, 245 s one after the other).
WORKER_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"
INVOCATIONS_FILE = "invocations.jsonl"
_INVOCATION_KEYS = ("commit", "parallel_runs", "runs_made", "wall_s")  # what the report reads


def _jobs(plan: list[tuple[str, int]]) -> list[tuple[list[tuple[str, int]], tuple[str, int] | None]]:
    """The plan as jobs [(runs done one after another in one worker, the run it must wait for)]: the MedSynapse-V
    rows of a seed share one three-stage run, so they form one job, after that seed's sft_k0 (their backbone)
    when the plan trains it; every other run is a job of its own."""
    jobs, medsynapse = [], collections.defaultdict(list)
    for row, seed in plan:
        if row in MEDSYNAPSE_ROWS:
            medsynapse[seed].append((row, seed))
        else:
            jobs.append(([(row, seed)], None))
    for seed, runs in medsynapse.items():
        runs.sort(key=lambda run: list(MEDSYNAPSE_ROWS).index(run[0]))  # stage order: each row trains its stage
        jobs.append((runs, ("sft_k0", seed) if ("sft_k0", seed) in plan else None))
    # Order: a MedSynapse-V job as soon as its sft_k0 is done (three stages: the longest job), then seed by seed,
    # each seed's sft_k0 first. Seed by seed, the two runs in flight are different rows (each compiles its own
    # programs) and a row's later seeds find its programs in the compilation cache; two seeds of one row started
    # together would both compile the same programs.
    seeds = list(dict.fromkeys(seed for _, seed in plan))

    def order(job):
        (row, seed), index = job[0][0], plan.index(job[0][0])
        return (0, 0, 0, index) if row in MEDSYNAPSE_ROWS else (1, seeds.index(seed), row != "sft_k0", index)

    return sorted(jobs, key=order)


def _run_job(config_dict: dict, workdir: str, runs: list[tuple[str, int]], data_dir: str, models: dict,
             runs_dir: str, commit: str) -> list[tuple[dict, float]]:
    """In a worker process: run_one for each run, its output in workdir/logs/<row>-seed<seed>.log."""
    _stop_with_parent()
    config = ml_collections.ConfigDict(config_dict)
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    out = []
    with _compilation_cache(config, workdir):
        for row, seed in runs:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(os.path.join(log_dir, f"{row}-seed{seed}.log"), "a") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                start = time.perf_counter()
                out.append((run_one(config, row, seed, data_dir, models, runs_dir, commit),
                            time.perf_counter() - start))
                sys.stdout.flush()
                sys.stderr.flush()
    return out


def _stop_with_parent(poll_s: float = 1.0, grace_s: float = 300.0) -> None:
    """In a worker: when the study process dies (killed, or a session's end) the worker would train on, orphaned,
    holding its run's workdir. A watchdog thread sends the worker SIGTERM instead, which the trainers treat as
    preemption (checkpoint, exit); the rerun resumes from that checkpoint. After `grace_s` it exits regardless."""
    import signal
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


@contextlib.contextmanager
def _environment(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_parallel(config, workdir: str, plan, data_dir: str, models: dict, runs_dir: str, commit: str,
                  workers: int, report_run, may_start=lambda: True) -> None:
    """The plan's jobs on `workers` processes (spawned, XLA on one thread each); a job waiting for another run
    starts once that run is done, and only while may_start() (the jobs in flight then finish). A failed run stops
    the study, naming the run and its log."""
    import concurrent.futures as cf
    import multiprocessing

    finished: set[tuple[str, int]] = set()
    for row, seed in plan:  # finished runs are read here, without a worker
        if _finished(runs_dir, row, seed):
            report_run(run_one(config, row, seed, data_dir, models, runs_dir, commit), 0.0)
            finished.add((row, seed))
    waiting = _jobs([key for key in plan if key not in finished])
    if not waiting:
        return
    flags_now = os.environ.get("XLA_FLAGS", "")
    print(f"study: {len(plan)} runs, {workers} at a time (logs in {os.path.join(workdir, 'logs')})", flush=True)
    with _environment(XLA_FLAGS=f"{flags_now} {WORKER_XLA_FLAGS}".strip()), cf.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: dict = {}
        try:
            while waiting or running:
                for job in [j for j in waiting if j[1] is None or j[1] in finished]:
                    if len(running) >= workers or not may_start():
                        break
                    waiting.remove(job)
                    running[pool.submit(_run_job, config.to_dict(), workdir, job[0], data_dir, models, runs_dir,
                                        commit)] = job
                if not running:
                    if not may_start():
                        return
                    raise StudyError(f"runs wait for runs that are not in the plan: {waiting}")
                ready, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in ready:
                    runs, _ = running.pop(future)
                    try:
                        outcomes = future.result()
                    except Exception as e:  # the worker's traceback is in its log
                        logs = ", ".join(os.path.join(workdir, "logs", f"{r}-seed{s}.log") for r, s in runs)
                        raise StudyError(f"run {runs[0][0]}/seed{runs[0][1]} failed: {type(e).__name__}: {e} "
                                         f"(log: {logs})") from e
                    for result, seconds in outcomes:
                        finished.add((result["row"], result["seed"]))
                        report_run(result, seconds)
        except BaseException:
            for future in running:
                future.cancel()
            raise


def _log_invocation(workdir: str, commit: str, parallel_runs: int, made: list[str],
                    seconds: float) -> None:
    """One line per study command in workdir/invocations.jsonl (`made`: its runs, "row/seedN"): the report's
    wall-clock cost."""
    append_json_line(os.path.join(workdir, INVOCATIONS_FILE),
                     {"commit": commit, "parallel_runs": parallel_runs, "runs_made": len(made), "made": made,
                      "wall_s": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def _invocations(workdir: str) -> list[dict]:
    """The study commands logged in workdir/invocations.jsonl; a line that cannot be read (what a kill while
    appending leaves) is skipped with a warning naming it: the report's wall clock then misses that command."""
    path = os.path.join(workdir, INVOCATIONS_FILE)
    if not os.path.exists(path):
        return []
    invocations = []
    for number, entry in iter_jsonl(path):
        if not isinstance(entry, LineError):
            missing = [k for k in _INVOCATION_KEYS if k not in entry]
            if not missing:
                invocations.append(entry)
                continue
            entry = LineError(f"no {', '.join(missing)}")
        logging.warning("%s:%d: %s; skipped (the report's wall clock leaves that command out)", path, number, entry)
    return invocations


def main(argv):
    cli.begin(argv, _CONFIG, _WORKDIR)
    start = time.perf_counter()
    try:
        out = study(_CONFIG.value, _WORKDIR.value, command_line(sys.argv[1:]))
    except (StudyError, ConfigError, CheckpointError) as e:
        cli.fail(e)
    if out["reused"]:
        print(f"reused {len(out['reused'])} finished run(s): {', '.join(out['reused'])}")
    if out["left"]:
        print(f"not run yet ({len(out['left'])}): {', '.join(out['left'])}; no report until they are "
              f"({(time.perf_counter() - start) / 60:.0f} min)")
    else:
        print(f"report: {out['report']} ({(time.perf_counter() - start) / 60:.0f} min)")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/study/phantom.py[:quick]", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "where data, pretrained models, runs and the report go")
    app.run(main, flags_parser=cli.parse_flags)
