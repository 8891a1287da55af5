"""The demo, orchestrated from above by `python -m vital_jax.train --config=configs/demo.py`: its assets before
training (`prepare`), then evaluation, an explanation and the HF export after it (`finish`).

`prepare(workdir, demo_config)` builds, under `workdir/demo/` (each step skipped when its output exists, so a
rerun or a resumed run reuses them):
  models        `demo.pretrain = "shipped"` (default): the small Qwen3-VL (all parameters) and Qwen3 decoder that
                ship in `vital_jax/assets/phantom_vlm/`, pretrained from random initialisation on phantom
                image-text data of their own seeds by `vital_jax.pretrain` (configs/study/pretrain_phantom.py;
                HF checkpoint directories with the tokenizer). Any other value names a pretraining variant
                (`pretrain.default_config(variant)`, e.g. "demo", "quick") run here into `pretrain/`.
  data/         PhantomVQA (configs/data/phantom_vqa.py) with `demo.split_counts` phantoms per split, then ROI
                features from a small random SigLIP (roi_encoder/)
and records them in READY.json, where `run.resolve_paths` finds them. Nothing is downloaded. A user with real
checkpoints and data sets `config.demo.enabled = False` and the paths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

from absl import logging

from vital_jax import assets, cli, demo_assets
from vital_jax import run as run_lib
from vital_jax.jsonio import atomic_write
from vital_jax.models.hf_config import ConfigError
from vital_jax.run import SHIPPED


def _pretrain_here(pretrain_dir: str, demo) -> None:
    from vital_jax import pretrain

    pre_config = pretrain.default_config(demo.pretrain)
    pre_config.seed = demo.seed
    cli.status(f"demo: pretraining a small Qwen3-VL and Qwen3 on phantom image-text data in {pretrain_dir}...")
    summary = pretrain.pretrain(pre_config, pretrain_dir)
    if summary["preempted"]:
        raise RuntimeError(f"demo pretraining in {pretrain_dir} was interrupted; rerun to resume it")


def _missing_assets(paths: run_lib.Paths) -> list[str]:
    """The files of the demo's assets that are not there (its backbone, decoder, ROI encoder, records and ROI
    features)."""
    from vital_jax.data import records

    wanted = [os.path.join(paths.backbone_dir, "config.json"), os.path.join(paths.decoder_dir, "config.json"),
              os.path.join(paths.encoder_dir, "config.json"), os.path.join(paths.data_dir, records.RECORDS_FILE),
              *(os.path.join(paths.data_dir, name) for name in (records.ROI_FEATURES_FILE,
                                                                records.ROI_TOP_PATCH_IDS_FILE,
                                                                records.ROI_TOP_PATCH_SCORES_FILE))]
    return [path for path in wanted if not os.path.exists(path)]


def prepare(workdir: str, demo) -> run_lib.Paths:
    """Build (or reuse) the demo assets; returns their paths (`run.resolve_paths` reads them back later)."""
    from vital_jax.data import records
    from vital_jax.data.build import build
    from vital_jax.data.build_config import phantom_vqa_config
    from vital_jax.data.roi import extract_dataset_rois

    root = os.path.join(os.path.abspath(workdir), run_lib.DEMO_DIR)
    done = os.path.join(root, run_lib.DEMO_READY_FILE)
    if os.path.exists(done):  # paths are rebuilt from `root`, so a copied demo folder uses its own files
        try:
            paths = run_lib.demo_paths(root, run_lib.demo_models(root))
            missing = _missing_assets(paths)
            if not missing:
                return paths
            # A deleted part would fail every later run; every step below reuses what it finds.
            logging.warning("%s says the demo's assets are built, but %s is missing; building what is missing",
                            done, missing[0])
        except ConfigError as e:   # a torn record: every step below reuses what it finds, so this is cheap
            logging.warning("%s; building the demo's assets again", e)
    if demo.pretrain == SHIPPED:
        assets.phantom_vlm()  # fails now, naming what is missing, rather than later in training
    else:
        _pretrain_here(os.path.join(root, "pretrain"), demo)
    models = SHIPPED if demo.pretrain == SHIPPED else "pretrain"
    paths = run_lib.demo_paths(root, models)

    data_cfg = phantom_vqa_config()
    data_cfg.out_dir = paths.data_dir
    data_cfg.seed = demo.seed
    data_cfg.phantoms.size = demo.phantom_size
    data_cfg.phantoms.split_counts = tuple(demo.split_counts)
    data_cfg.phantoms.modalities = tuple(demo.modalities)
    # With f_global too, so the per-step visual-target ablation (configs/ablation.py:per_step,demo) runs.
    extract_rois = functools.partial(extract_dataset_rois, paths.data_dir, paths.encoder_dir, batch_size=16,
                                     global_features=True)
    if records.interrupted_roi_write(paths.data_dir):  # killed mid-rename: redone first, as the build refuses it
        cli.status("demo: redoing the interrupted ROI extraction...")
        extract_rois()
    cli.status(f"demo: building the PhantomVQA dataset ({sum(demo.split_counts)} phantoms) in {paths.data_dir}...")
    build(data_cfg)
    if not os.path.exists(os.path.join(paths.encoder_dir, "config.json")):
        cli.status("demo: writing a small random SigLIP as the ROI encoder...")
        demo_assets.write_tiny_siglip(paths.encoder_dir, seed=demo.seed + 2)
    if records.load_roi_arrays(paths.data_dir) is None:
        cli.status("demo: extracting ROI features with it...")
        extract_rois()
    # Atomic: its presence means the assets are complete (a torn file would stop every later run).
    atomic_write(done, lambda f: json.dump({"models": models, **dataclasses.asdict(paths)}, f, indent=2))
    return paths


def finish(workdir: str, eval_limit: int | None = None, run: run_lib.TrainedRun | None = None) -> dict:
    """After training: evaluate the held-out PhantomVQA split (`phantom_vqa`: every test question, or the first
    `eval_limit`) at K=0 and K=K_max, explain one test example, export the run to HF format, and print the closed
    accuracy beside its majority-answer baselines (also in eval/k*/phantom_vqa.metrics.json as `closed_accuracy`
    and `closed_majority_baseline`, and with the per-question-type majority in eval/demo_summary.json) and where
    everything is. `run`: the workdir's run already loaded (`run.load_run`), else it is loaded here."""
    from conversion import vital_export
    from vital_jax.evaluate import RECORD_K, evaluate
    from vital_jax.explain import explain_example

    from vital_jax.data.records import RECORDS_FILE, read_records

    workdir = os.path.abspath(workdir)
    if run is None:
        cli.status("demo: loading the trained run for evaluation...")
        run = run_lib.load_run(workdir)
    k_max = run.model.config.k_max
    recs = read_records(os.path.join(run.paths.data_dir, RECORDS_FILE))
    split = "test" if any(r.split == "test" for r in recs) else "val"
    eval_dir = os.path.join(workdir, "eval")
    # K = K_max is the paper's protocol; "record" answers each question with the K its reasoning chain had in
    # training (yes/no and choice questions: 1), which the study found decisive at this scale (README).
    ks = [0, k_max, RECORD_K]
    summaries = evaluate(workdir, "phantom_vqa", run.paths.data_dir, eval_dir, ks, split=split,
                         limit=eval_limit, run=run, latency_examples=8)
    example = next(r for r in recs if r.split == split)
    explain_dir = os.path.join(workdir, "explain")
    cli.status(f"demo: explaining one {split} example (decoded latent steps, heatmaps)...")
    explanation = explain_example(run, os.path.join(run.paths.data_dir, example.image), example.question,
                                  explain_dir, k_max)
    export_dir = os.path.join(workdir, "export_hf")
    cli.status(f"demo: exporting the run to HF format in {export_dir}...")
    shutil.rmtree(export_dir, ignore_errors=True)   # the demo's own export of an earlier finish: made again
    vital_export.export_run(workdir, export_dir, run=run)

    from vital_jax.eval.floors import floors

    floor = floors(run.paths.data_dir, split, limit=eval_limit)["closed"]   # of the questions evaluated
    lines = ["", "VITAL demo results (a small Qwen3-VL pretrained here on phantoms, fine-tuned with VITAL on "
             "PhantomVQA; synthetic data, not medical accuracy)",
             f"  trained steps: {run.step}; held-out split: {split} ({summaries[0].get('count')} questions, "
             f"{summaries[0].get('closed', {}).get('count', 0)} closed-ended)",
             "  | K | closed accuracy | majority answer | majority answer per question type | majority answer "
             "per option set | chance | open token F1 | latency ms (batch 1) |", "  |---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    results = []
    for k, summary in zip(ks, summaries):
        latency = (summary.get("latency_ms") or {}).get("mean")
        label = "each question's own K" if k == RECORD_K else str(k)
        lines.append(f"  | {label} | {pct(summary.get('closed_accuracy'))} | "
                     f"{pct(summary.get('closed_majority_baseline'))} | {pct(floor['majority_by_type'])} | "
                     f"{pct(floor['majority_by_options'])} | {pct(floor['chance'])} | "
                     f"{pct(summary.get('open_token_f1'))} | "
                     + (f"{latency:.1f}" if isinstance(latency, (int, float)) else "n/a") + " |")
        results.append({"latent_steps": k, "closed_accuracy": summary.get("closed_accuracy"),
                        "closed_majority_baseline": summary.get("closed_majority_baseline"),
                        "closed_majority_by_type_baseline": floor["majority_by_type"],
                        "closed_majority_by_options_baseline": floor["majority_by_options"],
                        "closed_chance": floor["chance"], "open_token_f1": summary.get("open_token_f1")})
    atomic_write(os.path.join(eval_dir, "demo_summary.json"),
                 lambda f: json.dump({"split": split, "closed_count": floor["count"], "results": results}, f,
                                     indent=2))
    lines += ["", f"  example: Q: {example.question}", f"           A (K={k_max}): {explanation['answer']}"]
    lines += [f"           z{i + 1}: {t}" for i, t in enumerate(explanation["step_texts"])]
    lines += ["", "Artefacts:",
              f"  checkpoints      {workdir}/phase_1 .. phase_{len(run.config.curriculum.max_k)}",
              f"  metrics          {workdir}/metrics.jsonl, {workdir}/tensorboard",
              f"  evaluation       {eval_dir} (predictions, metrics, k_sweep.png)",
              f"  explanation      {explain_dir}/summary.png, step_*.png, explanation.json",
              f"  HF export        {export_dir} (loads with Qwen3VLForConditionalGeneration.from_pretrained)",
              f"  dataset          {run.paths.data_dir}"]
    print("\n".join(lines))
    return {"eval": summaries, "explanation": explanation, "export": export_dir}
