"""The demo's built-in assets: a synthetic phantom dataset with ROI features and tiny random models.

`prepare(workdir, demo_config)` builds, under `workdir/demo/` (each step skipped when its output exists, so a
rerun or a resumed run reuses them):
  data/        phantoms -> questions -> geometry teacher -> records.jsonl, then ROI features (tiny SigLIP)
  tokenizer/   a byte-level BPE over the dataset's own text with the Qwen special tokens
  backbone/    a tiny random Qwen3-VL in HF format;  decoder/  a tiny random Qwen3;  roi_encoder/  a tiny SigLIP
Nothing is downloaded. A user with real checkpoints and data sets `config.demo.enabled = False` and the paths.
"""

from __future__ import annotations

import json
import os

from absl import logging

from vital_jax import demo_assets


def prepare(workdir: str, demo) -> dict[str, str]:
    """Build (or reuse) the demo assets; returns {data_dir, tokenizer_dir, backbone_dir, decoder_dir, encoder_dir}."""
    from vital_jax.data import records
    from vital_jax.data.build import build
    from vital_jax.data.build_config import default_config
    from vital_jax.data.roi import extract_dataset_rois

    root = os.path.join(os.path.abspath(workdir), "demo")
    paths = {name: os.path.join(root, name)
             for name in ("data", "tokenizer", "backbone", "decoder", "roi_encoder")}
    done = os.path.join(root, "READY.json")
    if os.path.exists(done):
        return _named(paths)

    if not os.path.exists(os.path.join(paths["roi_encoder"], "config.json")):
        demo_assets.write_tiny_siglip(paths["roi_encoder"], seed=demo.seed + 2)
    data_cfg = default_config()
    data_cfg.out_dir = paths["data"]
    data_cfg.source = "phantoms"
    data_cfg.seed = demo.seed
    data_cfg.phantoms.count = demo.num_phantoms
    data_cfg.phantoms.size = demo.phantom_size
    data_cfg.teacher.kind = "geometry"
    logging.info("demo: building the phantom dataset in %s", paths["data"])
    build(data_cfg)
    if records.load_roi_arrays(paths["data"]) is None:
        logging.info("demo: extracting ROI features with the tiny SigLIP")
        # With f_global too, so the per-step visual-target ablation (configs/ablation.py:per_step,demo) runs.
        extract_dataset_rois(paths["data"], paths["roi_encoder"], batch_size=8, global_features=True)

    corpus = []
    for record in records.read_records(os.path.join(paths["data"], records.RECORDS_FILE)):
        corpus += [record.question, record.answer, *record.reasoning_chain]
    if not os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json")):
        demo_assets.write_tokenizer(paths["tokenizer"], corpus)
    if not os.path.exists(os.path.join(paths["backbone"], "config.json")):
        demo_assets.write_tiny_qwen3_vl(paths["backbone"], seed=demo.seed, hidden=demo.backbone_hidden,
                                        layers=demo.backbone_layers, image_pixels=demo.image_pixels,
                                        tokenizer_dir=paths["tokenizer"])
    if not os.path.exists(os.path.join(paths["decoder"], "config.json")):
        demo_assets.write_tiny_qwen3(paths["decoder"], seed=demo.seed + 1, hidden=demo.decoder_hidden,
                                     layers=demo.decoder_layers, tokenizer_dir=paths["tokenizer"])
    with open(done, "w") as f:
        json.dump(_named(paths), f, indent=2)
    return _named(paths)


def _named(paths: dict) -> dict[str, str]:
    return {"data_dir": paths["data"], "tokenizer_dir": paths["tokenizer"], "backbone_dir": paths["backbone"],
            "decoder_dir": paths["decoder"], "encoder_dir": paths["roi_encoder"]}


def finish(workdir: str, eval_limit: int = 24) -> dict:
    """After training: evaluate the held-out phantom split at K=0 and K=K_max, explain one test example, export
    the run to HF format, and print where everything is with a short results table."""
    from conversion import vital_export
    from vital_jax.evaluate import evaluate
    from vital_jax.explain import explain_example
    from vital_jax.inference import load_run

    workdir = os.path.abspath(workdir)
    run = load_run(workdir)
    k_max = run.model.config.k_max
    from vital_jax.data.records import RECORDS_FILE, read_records

    recs = read_records(os.path.join(run.paths.data_dir, RECORDS_FILE))
    split = "test" if any(r.split == "test" for r in recs) else "val"
    eval_dir = os.path.join(workdir, "eval")
    summaries = evaluate(workdir, "in_domain", run.paths.data_dir, eval_dir, [0, k_max], split=split,
                         limit=eval_limit, run=run, latency_examples=8)
    example = next(r for r in recs if r.split == split)
    explain_dir = os.path.join(workdir, "explain")
    explanation = explain_example(run, os.path.join(run.paths.data_dir, example.image), example.question,
                                  explain_dir, k_max)
    export_dir = os.path.join(workdir, "export_hf")
    vital_export.export_run(workdir, export_dir)

    rows = []
    for k, s in zip((0, k_max), summaries):
        overall = s.get("overall", {})
        acc = overall.get("accuracy", s.get("accuracy"))
        latency = s.get("latency_ms", {})
        rows.append((k, acc, latency.get("mean") if isinstance(latency, dict) else latency))
    lines = ["", "VITAL demo results (tiny random models trained on synthetic phantoms; numbers show the pipeline "
             "works, not medical accuracy)",
             f"  trained steps: {run.step}; held-out split: {split} ({summaries[0].get('count')} questions)",
             "  | K | accuracy | latency ms (batch 1) |", "  |---|---|---|"]
    for k, acc, ms in rows:
        acc_s = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else "n/a"
        ms_s = f"{ms:.1f}" if isinstance(ms, (int, float)) else "n/a"
        lines.append(f"  | {k} | {acc_s} | {ms_s} |")
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
