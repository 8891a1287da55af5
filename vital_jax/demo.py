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
        extract_dataset_rois(paths["data"], paths["roi_encoder"], batch_size=8)

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
