"""The whole data pipeline on the shared BiomedParse demo images: ingestion -> questions -> geometry teacher ->
ROI features (tiny random SigLIP) -> validated records -> a grain batch with the documented shapes."""

import json
import os

import numpy as np

from vital_jax.data import build, records
from vital_jax.data.build_config import default_config
from vital_jax.data.pipeline import PipelineConfig, make_train_iterator


def test_biomedparse_folder_becomes_a_training_batch(shared_data_dir, demo_assets, tmp_path):
    root = os.path.join(shared_data_dir, "biomedparse_demo")
    config = default_config()
    config.out_dir = str(tmp_path / "bp")
    config.source = "biomedparse"
    config.biomedparse.image_dir = os.path.join(root, "demo")
    config.biomedparse.mask_dir = os.path.join(root, "demo_mask")
    config.question_types = ["yes_no", "describe"]
    config.roi.enabled = True
    config.roi.encoder_dir = os.path.join(demo_assets, "roi_encoder")
    result = build.build(config)
    assert result["records"] == 62 * 2
    assert records.validate_dataset(config.out_dir) == []
    roi = records.load_roi_arrays(config.out_dir)
    assert roi["features"].shape[1] == 32  # the tiny SigLIP's hidden size
    np.testing.assert_allclose(np.linalg.norm(roi["features"], axis=1), 1.0, atol=1e-5)

    cfg = PipelineConfig(batch_size=4, prompt_buckets=(128, 256), max_answer_tokens=160, max_step_tokens=160,
                         k_max_slots=4, max_pixels=128 * 128, min_pixels=128 * 128)
    with open(os.path.join(demo_assets, "READY.json")) as f:
        tokenizer_dir = json.load(f)["tokenizer_dir"]  # the demo backbone's (a byte-level BPE over phantom text)
    batch = next(make_train_iterator(config.out_dir, tokenizer_dir, cfg, k_max=4))
    b = 4
    tp = batch["prompt_ids"].shape[1]
    assert tp in (128, 256) and batch["prompt_valid"].shape == (b, tp)
    assert batch["prompt_valid"][:, -1].all()  # left-padded: every prompt ends at the last slot
    assert batch["pixel_patches"].ndim == 2 and batch["pixel_patches"].shape[1] == 1536
    assert batch["image_grid_thw"].shape == (b, 3) and (batch["image_grid_thw"][:, 1:] == 8).all()
    assert batch["answer_ids"].shape[0] == b and batch["answer_valid"][:, 0].all()
    assert batch["step_ids"].shape[:2] == (b, 4) and batch["step_valid"].shape == batch["step_ids"].shape
    for i, k in enumerate(batch["latent_steps"]):
        assert batch["step_valid"][i, :k].any(axis=1).all() and not batch["step_valid"][i, k:].any()
    assert batch["roi_feature"].shape == (b, 32)
    assert batch["record_index"].dtype == np.int32 and batch["example_valid"].all()
