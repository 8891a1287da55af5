"""Adaptive ROI features (A.5): pathways, validity mask, pooling, top-k, errors, atomic dataset writing
(one unit under a journal: a crash between renames is refused until the command reruns)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from vital_jax.data import pipeline, records as records_lib, roi, roi_grid_search
from vital_jax.data.records import (GLOBAL_FEATURES_FILE, RECORDS_FILE, ROI_FEATURES_FILE, ROI_PROVENANCE_FILE,
                                    ROI_TOP_PATCH_IDS_FILE, ROI_TOP_PATCH_SCORES_FILE, ROI_WRITE_JOURNAL, RecordError,
                                    load_global_features)
from vital_jax.models.siglip import SiglipPreprocessor

GRID, SIZE, DIM = 4, 56, 8
PREPROCESSOR = SiglipPreprocessor(height=SIZE, width=SIZE)
# Patch features that ignore the pixels: row n of the table is patch n, so the pooled vector is hand-computable.
TABLE = np.random.RandomState(0).randn(GRID * GRID, DIM).astype(np.float32)


def _table_features(params, pixels):
    return jnp.broadcast_to(params["table"], (pixels.shape[0], *params["table"].shape))


def _nan_if_white_corner(params, pixels):
    poisoned = pixels[:, 0, 0, 0] > 0.99  # a white top-left pixel (normalised 1.0) makes that image's features NaN
    return jnp.where(poisoned[:, None, None], jnp.nan, _table_features(params, pixels))


TABLE_ENCODER = roi.RoiEncoder(_table_features, PREPROCESSOR, GRID)
TABLE_PARAMS = {"table": jnp.asarray(TABLE)}


def _unit(v):
    return v / np.linalg.norm(v)


def _image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8)


def _mask(h, w, top, left, bottom, right):
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


def _ids(rows, cols):
    return sorted(r * GRID + c for r in rows for c in cols)


def test_threshold_chooses_full_or_crop_pathway():
    images = [_image(100, 100)] * 3
    masks = [_mask(100, 100, 0, 0, 30, 50), _mask(100, 100, 0, 0, 20, 50), _mask(100, 100, 0, 0, 20, 25)]
    # Area ratios 0.15, 0.10, 0.05; the full image is used at ratio >= T.
    for threshold, expected in [(0.2, ["crop", "crop", "crop"]), (0.1, ["full", "full", "crop"]),
                                (0.05, ["full", "full", "full"])]:
        out = roi.extract_roi_features(images, masks, TABLE_ENCODER, TABLE_PARAMS, roi.RoiConfig(threshold=threshold))
        assert out.pathway.tolist() == expected, threshold


@pytest.mark.parametrize("rows, pooled_rows", [(33, [0, 1]), (32, [0])])
def test_full_pathway_pools_mask_aligned_patches_binarised_at_03(rows, pooled_rows):
    # 100x100 image on a 4x4 grid: cells of 25 px. A mask of the top `rows` rows covers 8/25 = 0.32 (kept) or
    # 7/25 = 0.28 (dropped) of the second cell row.
    out = roi.extract_roi_features([_image(100, 100)], [_mask(100, 100, 0, 0, rows, 100)], TABLE_ENCODER,
                                   TABLE_PARAMS, roi.RoiConfig(threshold=0.2))
    assert out.pathway.tolist() == ["full"]
    pooled = _ids(pooled_rows, range(GRID))
    np.testing.assert_allclose(out.features[0], _unit(TABLE[pooled].mean(0)), atol=1e-6)
    assert np.flatnonzero(out.roi_patches[0]).tolist() == pooled


@pytest.mark.parametrize("padding", [0.0, 0.25])
def test_crop_pathway_pools_valid_patches_only(padding):
    # Mask box 40x20 px (ratio 0.02). With P=0 the crop is 40x20, with P=0.25 it is 60x30; either way the square
    # canvas holds the crop in its middle half of columns, so only grid columns 1 and 2 are valid.
    image, mask = _image(200, 200), _mask(200, 200, 50, 100, 90, 120)
    out = roi.extract_roi_features([image], [mask], TABLE_ENCODER, TABLE_PARAMS, roi.RoiConfig(padding=padding))
    valid = _ids(range(GRID), [1, 2])
    assert out.pathway.tolist() == ["crop"]
    assert np.flatnonzero(out.valid_patches[0]).tolist() == valid
    np.testing.assert_allclose(out.features[0], _unit(TABLE[valid].mean(0)), atol=1e-6)
    margin_y, margin_x = round(40 * padding), round(20 * padding)
    assert out.boxes[0].tolist() == [50 - margin_y, 100 - margin_x, 90 + margin_y, 120 + margin_x]

    view = roi.prepare_view(image, mask, TABLE_ENCODER, roi.RoiConfig(padding=padding))
    # Zero padding (black, normalised to -1) fills the left and right quarter of the encoded square.
    np.testing.assert_array_equal(view.pixels[:, :8], -1.0)
    np.testing.assert_array_equal(view.pixels[:, -8:], -1.0)
    crop = image[out.boxes[0][0]:out.boxes[0][2], out.boxes[0][1]:out.boxes[0][3]]
    assert np.abs(view.pixels[:, 20:36]).mean() > 0.1 and crop.std() > 0  # real content in the middle


def test_fewer_pooled_patches_than_k_leave_unused_slots():
    out = roi.extract_roi_features([_image(100, 100)], [_mask(100, 100, 0, 0, 50, 50)], TABLE_ENCODER,
                                   TABLE_PARAMS, roi.RoiConfig(threshold=0.2, top_k=5))
    pooled = _ids([0, 1], [0, 1])
    assert sorted(out.top_ids[0, :4].tolist()) == pooled
    assert out.top_ids[0, 4] == -1 and out.top_scores[0, 4] == 0.0


def test_crop_without_valid_patch_names_the_record():
    # A 2x100 px box: on a 4x4 grid no canvas cell is half image content.
    with pytest.raises(roi.RoiError, match="thin: the 2x100 px crop is so elongated"):
        roi.extract_roi_features([_image(100, 100)], [_mask(100, 100, 50, 0, 52, 100)], TABLE_ENCODER,
                                 TABLE_PARAMS, names=["thin"])


def test_empty_mask_names_the_record():
    with pytest.raises(roi.RoiError, match="record 'b'.*empty"):
        roi.extract_roi_features([_image(50, 50)] * 2, [_mask(50, 50, 0, 0, 10, 10), np.zeros((50, 50), bool)],
                                 TABLE_ENCODER, TABLE_PARAMS, names=["record 'a'", "record 'b'"])


def test_a_mask_file_is_read_as_validation_reads_it(tmp_path):
    """A grey (anti-aliased) mask file was thresholded at 128 here while `validate` refuses it: now both refuse
    it, naming the record and the file; 0/1 and 0/255 files read the same."""
    from PIL import Image

    grey = np.zeros((20, 20), np.uint8)
    grey[5:10, 5:10] = 255
    grey[5, 5] = 128
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(roi.RoiError, match=r"rec3: .*grey\.png: not a binary mask"):
        roi.load_mask(str(tmp_path / "grey.png"), "rec3")
    Image.fromarray((grey > 0).astype(np.uint8)).save(tmp_path / "ones.png")
    Image.fromarray((grey > 0).astype(np.uint8) * 255).save(tmp_path / "full.png")
    np.testing.assert_array_equal(roi.load_mask(str(tmp_path / "ones.png")), grey > 0)
    np.testing.assert_array_equal(roi.load_mask(str(tmp_path / "full.png")), grey > 0)


def test_mask_size_mismatch_names_the_record():
    with pytest.raises(roi.RoiError, match="rec7: mask is 40x50"):
        roi.extract_roi_features([_image(50, 60)], [_mask(50, 40, 0, 0, 10, 10)], TABLE_ENCODER, TABLE_PARAMS,
                                 names=["rec7"])


def test_non_finite_feature_names_the_record():
    encoder = roi.RoiEncoder(_nan_if_white_corner, PREPROCESSOR, GRID)
    white = np.full((50, 50, 3), 255, np.uint8)
    with pytest.raises(roi.RoiError, match="^rec_white: the ROI feature is not finite"):
        roi.extract_roi_features([_image(50, 50), white, _image(50, 50, 1)], [_mask(50, 50, 0, 0, 40, 40)] * 3,
                                 encoder, TABLE_PARAMS, roi.RoiConfig(batch_size=2),
                                 names=["rec_ok", "rec_white", "rec_ok2"])


def test_area_downsample_matches_torch_area_interpolation():
    values = np.random.RandomState(1).rand(37, 53).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(values)[None, None], size=(4, 4), mode="area")
    np.testing.assert_allclose(roi.area_downsample(values, 4), expected[0, 0].numpy(), atol=1e-6)


def test_patch_similarity_map_is_cosine_in_raster_order():
    patches = np.array([[2, 0], [0, 3], [-1, 0], [1, 1]], np.float32)
    sim = roi.patch_similarity_map(np.array([5.0, 0.0]), patches)
    np.testing.assert_allclose(sim, [[1, 0], [-1, 2 ** -0.5]], atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        roi.patch_similarity_map(np.ones(2), np.ones((3, 2)))


# ---------------------------------------------------------------------------------------------------------------
# With a real (tiny, random) SigLIP loaded from a HF directory
# ---------------------------------------------------------------------------------------------------------------

VISION_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                 patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def write_tiny_siglip(path: str, seed: int = 0) -> transformers.SiglipVisionModel:
    """A random HF SiglipVisionModel directory with a matching preprocessor_config.json."""
    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(**VISION_KW)
    config._attn_implementation = "eager"
    model = transformers.SiglipVisionModel(config).eval()
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor", "size": {"height": SIZE, "width": SIZE},
                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}, f)
    return model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("siglip"))
    return path, write_tiny_siglip(path)


def test_patch_features_match_transformers_last_block_and_last_hidden_state(siglip_dir):
    path, hf_model = siglip_dir
    pixels = np.random.RandomState(0).randn(2, SIZE, SIZE, 3).astype(np.float32)
    with torch.no_grad():
        hf_out = hf_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    for layer, expected in [("last_block", hf_out.hidden_states[-1]), ("post_layernorm", hf_out.last_hidden_state)]:
        encoder, params = roi.load_roi_encoder(path, feature_layer=layer)
        np.testing.assert_allclose(encoder.patch_features(params, pixels), expected.numpy(), atol=1e-4)


def test_features_are_unit_norm_and_top_k_is_the_true_top_k(siglip_dir):
    encoder, params = roi.load_roi_encoder(siglip_dir[0])
    images = [_image(90, 120, s) for s in range(3)]
    masks = [_mask(90, 120, 0, 0, 60, 80), _mask(90, 120, 10, 20, 30, 35), _mask(90, 120, 50, 90, 90, 120)]
    cfg = roi.RoiConfig(batch_size=2)
    out = roi.extract_roi_features(images, masks, encoder, params, cfg)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-6)
    for i, (image, mask) in enumerate(zip(images, masks)):
        view = roi.prepare_view(image, mask, encoder, cfg)
        patches = np.asarray(encoder.patch_features(params, view.pixels[None]))[0].astype(np.float64)
        pooled = _unit(patches[view.pool].mean(0))
        np.testing.assert_allclose(out.features[i], pooled, atol=1e-5)
        cosine = patches @ pooled / np.linalg.norm(patches, axis=1)
        cosine[~view.pool] = -np.inf
        top = np.argsort(-cosine, kind="stable")[:5]
        assert out.top_ids[i].tolist() == top.tolist()
        np.testing.assert_allclose(out.top_scores[i], cosine[top], atol=1e-5)
    # The padded last batch gives the same numbers as one unpadded batch.
    alone = roi.extract_roi_features(images, masks, encoder, params, roi.RoiConfig(batch_size=3))
    np.testing.assert_allclose(alone.features, out.features, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Dataset level
# ---------------------------------------------------------------------------------------------------------------


def _write_dataset(root, masks_by_record: dict[str, tuple[str, tuple[int, int, int, int]]]):
    """Images a.png, b.png (80x100 RGB) and masks m_<name>.png (0/255); records in dict order."""
    os.makedirs(root, exist_ok=True)
    for seed, name in enumerate(["a", "b"]):
        Image.fromarray(_image(80, 100, seed)).save(os.path.join(root, f"{name}.png"))
    records = []
    for record_id, (image, box) in masks_by_record.items():
        mask_name = f"m_{image}_{'_'.join(map(str, box))}.png"
        Image.fromarray((_mask(80, 100, *box) * 255).astype(np.uint8)).save(os.path.join(root, mask_name))
        records.append(dict(id=record_id, image=f"{image}.png", mask=mask_name, question="q?", answer="ans",
                            reasoning_chain=["s"], latent_steps=1, question_type="yes_no", target="liver",
                            target_type="organ", modality="CT", source="test", split="train", roi_index=-1))
    with open(os.path.join(root, "records.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _snapshot(root):
    return {name: open(os.path.join(root, name), "rb").read() for name in sorted(os.listdir(root))}


def test_dataset_extraction_dedupes_pairs_and_rewrites_records(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    records = _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30)),
                                    "r2": ("a", (0, 0, 60, 70)), "r3": ("a", (10, 10, 20, 30))})
    out = roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)
    written = _read_jsonl(os.path.join(root, "records.jsonl"))
    assert [r["roi_index"] for r in written] == [0, 1, 0, 2]
    assert [{k: v for k, v in r.items() if k != "roi_index"} for r in written] == \
        [{k: v for k, v in r.items() if k != "roi_index"} for r in records]
    features = np.load(os.path.join(root, ROI_FEATURES_FILE))
    ids = np.load(os.path.join(root, ROI_TOP_PATCH_IDS_FILE))
    scores = np.load(os.path.join(root, ROI_TOP_PATCH_SCORES_FILE))
    assert (features.shape, features.dtype, ids.shape, ids.dtype, scores.shape, scores.dtype) == \
        ((3, 32), np.float32, (3, 5), np.int32, (3, 5), np.float32)
    encoder, params = roi.load_roi_encoder(siglip_dir[0])
    pairs = [(r["image"], r["mask"]) for r in (records[0], records[1], records[3])]
    direct = roi.extract_roi_features([os.path.join(root, i) for i, _ in pairs],
                                      [os.path.join(root, m) for _, m in pairs], encoder, params)
    np.testing.assert_allclose(features, direct.features, atol=1e-6)
    assert out.pathway.tolist() == ["full", "crop", "crop"]

    before = _snapshot(root)
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)  # re-runnable: same files again
    assert _snapshot(root).keys() == before.keys()
    np.testing.assert_allclose(np.load(os.path.join(root, ROI_FEATURES_FILE)), features, atol=1e-6)
    assert _read_jsonl(os.path.join(root, "records.jsonl")) == written


def test_the_dataset_records_how_its_roi_features_were_made(siglip_dir, tmp_path):
    from vital_jax.data.records import roi_feature_layer

    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30))})
    assert roi_feature_layer(root) == "last_block"  # nothing recorded: the default, as older datasets
    roi.extract_dataset_rois(root, siglip_dir[0], threshold=0.1, batch_size=2, feature_layer="post_layernorm")
    provenance = json.load(open(os.path.join(root, ROI_PROVENANCE_FILE)))
    assert provenance == {"encoder_dir": os.path.abspath(siglip_dir[0]), "feature_layer": "post_layernorm",
                          "threshold": 0.1, "padding": 0.05, "dim": 32, "global_features": False}
    assert roi_feature_layer(root) == "post_layernorm"
    with open(os.path.join(root, ROI_PROVENANCE_FILE), "w") as f:
        f.write('{"feature_layer": ')
    with pytest.raises(RecordError, match=f"{ROI_PROVENANCE_FILE}: malformed JSON"):
        roi_feature_layer(root)


def test_global_features_average_every_patch_of_the_whole_image(siglip_dir):
    # Pixel-independent table features: f_global is the normalised mean of all 16 rows, whatever the image.
    table_global = roi.extract_global_features([_image(80, 100), _image(40, 40, 1)], TABLE_ENCODER, TABLE_PARAMS,
                                               batch_size=4)
    np.testing.assert_allclose(table_global, np.stack([_unit(TABLE.mean(0))] * 2), atol=1e-6)
    # The real encoder: the same as pooling its patch features of the plain-resized image by hand.
    encoder, params = roi.load_roi_encoder(siglip_dir[0])
    images = [_image(80, 100, seed) for seed in range(3)]
    got = roi.extract_global_features(images, encoder, params, batch_size=2)
    pixels = np.stack([encoder.preprocessor(Image.fromarray(img)) for img in images])
    patches = np.asarray(encoder.patch_features(params, jnp.asarray(pixels)), np.float64)
    expected = patches.mean(1) / np.linalg.norm(patches.mean(1), axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(roi.RoiError, match="image 1: .*no such image file"):
        roi.extract_global_features([images[0], "/nonexistent/x.png"], encoder, params)


def test_dataset_extraction_writes_global_features_per_row_image(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30)),
                          "r3": ("a", (10, 10, 20, 30))})
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2, global_features=True)
    global_rows = np.load(os.path.join(root, GLOBAL_FEATURES_FILE))
    assert global_rows.shape == np.load(os.path.join(root, ROI_FEATURES_FILE)).shape
    encoder, params = roi.load_roi_encoder(siglip_dir[0])
    per_image = roi.extract_global_features([os.path.join(root, "a.png"), os.path.join(root, "b.png")], encoder,
                                            params)
    # Rows are (image, mask) pairs in first-seen order: (a, box0), (b, box1), (a, box1).
    np.testing.assert_allclose(global_rows, per_image[[0, 1, 0]], atol=1e-6)
    assert load_global_features(root).shape == (3, 32)
    # A rerun without the flag keeps the file aligned with the rewritten rows rather than leaving it stale.
    os.remove(os.path.join(root, "a.png"))
    Image.fromarray(_image(80, 100, 7)).save(os.path.join(root, "a.png"))
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)
    again = np.load(os.path.join(root, GLOBAL_FEATURES_FILE))
    assert not np.allclose(again[0], global_rows[0]) and np.allclose(again[1], global_rows[1], atol=1e-6)


def test_dataset_extraction_error_leaves_directory_untouched(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"good": ("a", (0, 0, 60, 70)), "bad_empty": ("b", (5, 5, 5, 5))})
    before = _snapshot(root)
    with pytest.raises(roi.RoiError, match="record 'bad_empty'.*empty"):
        roi.extract_dataset_rois(root, siglip_dir[0])
    assert _snapshot(root) == before  # no arrays, no temporaries, records.jsonl byte-identical


class _Killed(BaseException):
    """Stands for kill -9 or a power loss: no cleanup of the code under test runs after it."""


def _crash_before_renaming(monkeypatch, target: str) -> None:
    """Make a rename onto `target` die like a killed process; the renames before it are done."""
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == target:
            raise _Killed(f"killed before renaming {target}")
        real_replace(src, dst)

    monkeypatch.setattr(roi.os, "replace", replace)


def _temporaries(root):
    return sorted(name for name in os.listdir(root) if ".tmp-" in name)


def _crashed_dataset(siglip_dir, root, target, monkeypatch):
    """A dataset with ROI and global features whose second ROI run (another image a.png) died before renaming
    `target` (rename order: roi_features.json, the arrays, global_features.npy, records.jsonl)."""
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30)),
                          "r2": ("a", (10, 10, 20, 30))})
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2, global_features=True)
    Image.fromarray(_image(80, 100, 7)).save(os.path.join(root, "a.png"))
    with monkeypatch.context() as patched:
        _crash_before_renaming(patched, target)
        with pytest.raises(_Killed):
            roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)


@pytest.mark.parametrize("target", [ROI_FEATURES_FILE, RECORDS_FILE])
def test_a_crash_between_renames_is_refused_naming_the_journal(siglip_dir, tmp_path, monkeypatch, target):
    root = str(tmp_path / "ds")
    _crashed_dataset(siglip_dir, root, target, monkeypatch)
    journal = os.path.join(root, ROI_WRITE_JOURNAL)
    assert os.path.exists(journal)
    # The journal names every target and its temporary, in rename order.
    listed = json.load(open(journal))["targets"]
    assert list(listed) == [ROI_PROVENANCE_FILE, ROI_FEATURES_FILE, ROI_TOP_PATCH_IDS_FILE,
                            ROI_TOP_PATCH_SCORES_FILE, GLOBAL_FEATURES_FILE, RECORDS_FILE]
    assert listed[RECORDS_FILE] == f".{RECORDS_FILE}.tmp-{os.getpid()}"
    message = (re.escape(journal) + ": an ROI write was interrupted .* may come from different runs; rerun python -m "
               r"vital_jax\.data\.roi --data_dir=" + re.escape(root) + " --encoder_dir=ENCODER_DIR --global_features")
    with pytest.raises(RecordError, match=message):
        records_lib.load_roi_arrays(root)
    with pytest.raises(RecordError, match=message):
        load_global_features(root)
    with pytest.raises(RecordError, match=message):
        records_lib.roi_feature_layer(root)
    with pytest.raises(RecordError, match=message):  # the training pipeline, before it reads any tokenizer
        pipeline.make_train_iterator(root, str(tmp_path / "no_tokenizer"), pipeline.PipelineConfig(), k_max=4,
                                     process_index=0, process_count=1)
    problems = records_lib.validate_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(f"{journal}: an ROI write was interrupted"), problems


def test_rerunning_after_a_crash_restores_one_generation_and_clears_the_leftovers(siglip_dir, tmp_path,
                                                                                 monkeypatch):
    root = str(tmp_path / "ds")
    _crashed_dataset(siglip_dir, root, ROI_TOP_PATCH_SCORES_FILE, monkeypatch)
    assert _temporaries(root)  # the crash left the temporaries it had not renamed yet
    # Temporaries of other killed runs: of a file this run writes, and of one only the journal names.
    strays = [f".{ROI_FEATURES_FILE}.tmp-999999", f".{GLOBAL_FEATURES_FILE}.tmp-424242"]
    for name in strays:
        open(os.path.join(root, name), "wb").close()
    journal = json.load(open(os.path.join(root, ROI_WRITE_JOURNAL)))
    with open(os.path.join(root, ROI_WRITE_JOURNAL), "w") as f:  # as if the crashed run had written one more file
        json.dump({"targets": {**journal["targets"], "extra.npy": ".extra.npy.tmp-1"}}, f)
    open(os.path.join(root, ".extra.npy.tmp-1"), "wb").close()
    open(os.path.join(root, ".notes.tmp-12"), "wb").close()  # someone else's file: not ours to remove

    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)
    assert not os.path.exists(os.path.join(root, ROI_WRITE_JOURNAL))
    assert _temporaries(root) == [".notes.tmp-12"]
    assert records_lib.validate_dataset(root) == []
    # One generation: the rerun's files are those of a clean run on the same inputs.
    clean = str(tmp_path / "clean")
    _write_dataset(clean, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30)),
                           "r2": ("a", (10, 10, 20, 30))})
    Image.fromarray(_image(80, 100, 7)).save(os.path.join(clean, "a.png"))
    roi.extract_dataset_rois(clean, siglip_dir[0], batch_size=2, global_features=True)
    for name in (ROI_FEATURES_FILE, ROI_TOP_PATCH_IDS_FILE, ROI_TOP_PATCH_SCORES_FILE, GLOBAL_FEATURES_FILE):
        np.testing.assert_allclose(np.load(os.path.join(root, name)), np.load(os.path.join(clean, name)), atol=1e-6)
    assert _read_jsonl(os.path.join(root, RECORDS_FILE)) == _read_jsonl(os.path.join(clean, RECORDS_FILE))
    assert records_lib.load_roi_arrays(root)["features"].shape == (3, 32)


def _failing_writer(f):
    f.write(b"partial")
    raise OSError("disk full")


@pytest.mark.parametrize("second_failure", ["writing a temporary", "crash between renames"])
def test_a_failed_rerun_after_a_crash_keeps_the_journal(siglip_dir, tmp_path, monkeypatch, second_failure):
    """The journal goes only with a complete new generation, so a second failure cannot hide the first."""
    root = str(tmp_path / "ds")
    _crashed_dataset(siglip_dir, root, RECORDS_FILE, monkeypatch)
    writers = {ROI_FEATURES_FILE: lambda f: np.save(f, np.eye(3, dtype=np.float32)),
               RECORDS_FILE: lambda f: f.write(b"")}
    if second_failure == "writing a temporary":
        before = {name: data for name, data in _snapshot(root).items() if ".tmp-" not in name}
        with pytest.raises(OSError, match="disk full"):
            roi.write_files_atomically(root, {**writers, RECORDS_FILE: _failing_writer})
        assert _snapshot(root) == before  # the old files and journal untouched, every temporary gone
    else:
        with monkeypatch.context() as patched:
            _crash_before_renaming(patched, RECORDS_FILE)
            with pytest.raises(_Killed):
                roi.write_files_atomically(root, writers)
    with pytest.raises(RecordError, match=f"{ROI_WRITE_JOURNAL}: an ROI write was interrupted"):
        records_lib.load_roi_arrays(root)


@pytest.mark.parametrize("failure", ["writing a temporary", "writing the journal"])
def test_a_failure_before_the_renames_leaves_the_old_files_and_no_journal(siglip_dir, tmp_path, monkeypatch,
                                                                         failure):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30))})
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)
    before = _snapshot(root)
    writers = {ROI_FEATURES_FILE: lambda f: np.save(f, np.eye(3, dtype=np.float32)),
               RECORDS_FILE: lambda f: f.write(b"")}
    if failure == "writing a temporary":
        writers[ROI_TOP_PATCH_IDS_FILE] = _failing_writer
    else:
        def no_space(path, write, binary=False):
            raise OSError(f"{path}: disk full")

        monkeypatch.setattr(roi, "atomic_write", no_space)
    with pytest.raises(OSError, match="disk full"):
        roi.write_files_atomically(root, writers)
    assert _snapshot(root) == before  # byte-identical, no journal, no temporaries
    assert records_lib.load_roi_arrays(root)["features"].shape == (2, 32)


def test_every_rename_happens_under_the_journal_which_goes_after_the_last(siglip_dir, tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30))})
    journal = os.path.join(root, ROI_WRITE_JOURNAL)
    renamed, real_replace = [], os.replace

    def replace(src, dst):
        if os.path.dirname(dst) == root and os.path.basename(dst) != ROI_WRITE_JOURNAL:
            renamed.append((os.path.basename(dst), os.path.exists(journal)))
        real_replace(src, dst)

    monkeypatch.setattr(roi.os, "replace", replace)
    roi.extract_dataset_rois(root, siglip_dir[0], batch_size=2)
    assert renamed == [(name, True) for name in (ROI_PROVENANCE_FILE, ROI_FEATURES_FILE, ROI_TOP_PATCH_IDS_FILE,
                                                 ROI_TOP_PATCH_SCORES_FILE, RECORDS_FILE)]
    assert not os.path.exists(journal) and _temporaries(root) == []
    assert records_lib.validate_dataset(root) == []


def test_malformed_records_line_is_named(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"good": ("a", (0, 0, 60, 70))})
    with open(os.path.join(root, "records.jsonl"), "a") as f:
        f.write('{"id": \n')
    before = _snapshot(root)
    with pytest.raises(RecordError, match="records.jsonl:2: malformed JSON"):
        roi.extract_dataset_rois(root, siglip_dir[0])
    assert _snapshot(root) == before


def test_cli_writes_roi_files(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30))})
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it
    done = subprocess.run([sys.executable, "-m", "vital_jax.data.roi", f"--data_dir={root}",
                           f"--encoder_dir={siglip_dir[0]}", "--threshold=0.1", "--padding=0.1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # No library INFO lines (JAX's "Unable to initialize backend 'tpu'" was one on every run).
    assert not re.search(r"^I\d{4} ", done.stderr, re.M), done.stderr[-2000:]
    assert "1 full-image, 1 tight-crop" in done.stdout
    assert [r["roi_index"] for r in _read_jsonl(os.path.join(root, "records.jsonl"))] == [0, 1]
    assert not os.path.exists(os.path.join(root, "RUNNING.lock"))  # held while writing, released after
    # Not while another writer (a build, another ROI command) holds the directory: two would mix their files.
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(os.path.join(root, "RUNNING.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": running.pid, "since": "2025-01-01 00:00:00"}, f)
        before = _snapshot(root)
        busy = subprocess.run(done.args, capture_output=True, text=True, env=env, timeout=120)
    finally:
        running.kill()
        running.wait()
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1, busy.stderr[-2000:]
    assert f"{root} is in use by another run" in busy.stderr and "use another --data_dir" in busy.stderr
    assert _snapshot(root) == before


# ---------------------------------------------------------------------------------------------------------------
# Grid search (A.5.3)
# ---------------------------------------------------------------------------------------------------------------


def test_grid_metrics_hand_case():
    # Full pathway, mask = top half: ROI patches are grid rows 0-1, background rows 2-3.
    out = roi.extract_roi_features([_image(100, 100)], [_mask(100, 100, 0, 0, 50, 100)], TABLE_ENCODER,
                                   TABLE_PARAMS)
    metrics = roi_grid_search.pair_metrics(out)
    norms = np.linalg.norm(TABLE.astype(np.float64), axis=1)
    roi_ids, background_ids = _ids([0, 1], range(GRID)), _ids([2, 3], range(GRID))
    np.testing.assert_allclose(metrics["coverage"], [0.5])
    np.testing.assert_allclose(metrics["intensity"], [norms[roi_ids].mean()], rtol=1e-6)
    np.testing.assert_allclose(metrics["snr"], [norms[roi_ids].mean() / norms[background_ids].mean()], rtol=1e-6)


def test_grid_search_matches_direct_extraction_per_setting():
    images = [_image(100, 100, s) for s in range(4)]
    masks = [_mask(100, 100, 40, 40, 54, 54), _mask(100, 100, 10, 10, 30, 50), _mask(100, 100, 0, 0, 30, 50),
             _mask(100, 100, 20, 0, 80, 50)]  # ratios 0.0196, 0.08, 0.15, 0.30
    thresholds, paddings = (0.05, 0.1, 0.2), (0.0, 0.1)
    results = roi_grid_search.grid_search_pairs(images, masks, TABLE_ENCODER, TABLE_PARAMS, thresholds, paddings,
                                                batch_size=3)
    assert [(r["threshold"], r["padding"]) for r in results] == [(t, p) for t in thresholds for p in paddings]
    for result in results:
        direct = roi.extract_roi_features(images, masks, TABLE_ENCODER, TABLE_PARAMS,
                                          roi.RoiConfig(threshold=result["threshold"], padding=result["padding"]))
        metrics = roi_grid_search.pair_metrics(direct)
        assert result["full_fraction"] == np.mean(direct.pathway == "full")
        np.testing.assert_allclose(result["coverage_pct"], 100 * metrics["coverage"].mean())
        np.testing.assert_allclose(result["intensity"], np.nanmean(metrics["intensity"]))
        np.testing.assert_allclose(result["snr"], np.nanmean(metrics["snr"]))
        assert result["num_snr"] == np.isfinite(metrics["snr"]).sum()


def test_grid_search_cli_writes_json(siglip_dir, tmp_path):
    root = str(tmp_path / "ds")
    _write_dataset(root, {"r0": ("a", (0, 0, 60, 70)), "r1": ("b", (10, 10, 20, 30)), "r2": ("b", (0, 0, 30, 40))})
    out_file = str(tmp_path / "grid.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "vital_jax.data.roi_grid_search", f"--data_dir={root}",
                           f"--encoder_dir={siglip_dir[0]}", "--thresholds=0.1,0.2", "--paddings=0,0.05",
                           f"--out={out_file}"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out_file) as f:
        report = json.load(f)
    assert report["num_pairs"] == 3 and len(report["results"]) == 4
    assert all(r["intensity"] > 0 and r["num_pairs"] == 3 for r in report["results"])
    assert "coverage_pct" in done.stdout
    with open(tmp_path / "grid.png", "rb") as f:                      # the Figure 9 heatmaps beside the JSON
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_grid_figure_has_one_annotated_heatmap_and_colour_bar_per_metric(tmp_path):
    from vital_jax.eval import figures

    thresholds, paddings = [0.05, 0.1], [0.0, 0.05, 0.1]
    results = [dict(threshold=t, padding=p, coverage_pct=100 * t + 10 * p, intensity=2750.0 + 10 * p,
                    snr=None if (t, p) == (0.1, 0.1) else 1.5 + t) for t in thresholds for p in paddings]
    report = dict(num_pairs=7, feature_layer="last_block", thresholds=thresholds, paddings=paddings,
                  results=results)
    fig = roi_grid_search.grid_figure(report)
    assert len(fig.axes) == 6                                       # coverage, intensity, snr + 3 colour bars
    coverage, intensity, snr = fig.axes[:3]
    assert [t.get_text() for t in coverage.get_yticklabels()] == ["T=0.05", "T=0.1"]
    assert [t.get_text() for t in coverage.get_xticklabels()] == ["P=0", "P=0.05", "P=0.1"]
    assert [t.get_text() for t in coverage.texts] == ["5.0", "5.5", "6.0", "10.0", "10.5", "11.0"]
    assert intensity.texts[0].get_text() == "2750" and snr.texts[-1].get_text() == "n/a"
    assert "7 (image, mask) pairs" in fig._suptitle.get_text()
    path = figures.save(fig, str(tmp_path / "grid.svg"))
    assert b"<svg" in open(path, "rb").read(4096)


def test_every_biomedparse_demo_mask_extracts(shared_data_dir):
    """Real masks (RGBA 0/255, 0.02%-17% of the image) on a MedSigLIP-sized 32x32 grid: no errors, the
    pathway follows the area ratio, and the encoded region contains the whole mask."""
    demo = os.path.join(shared_data_dir, "biomedparse_demo")
    mask_names = sorted(os.listdir(os.path.join(demo, "demo_mask")))
    images = {n[:-4] for n in os.listdir(os.path.join(demo, "demo"))}
    image_of = {m: next(i for i in images if m.startswith(i + "_")) for m in mask_names}
    encoder = roi.RoiEncoder(_table_features, SiglipPreprocessor(height=448, width=448), 32)
    params = {"table": jnp.asarray(np.random.RandomState(2).randn(32 * 32, DIM).astype(np.float32))}
    masks = [os.path.join(demo, "demo_mask", m) for m in mask_names]
    out = roi.extract_roi_features([os.path.join(demo, "demo", image_of[m] + ".png") for m in mask_names], masks,
                                   encoder, params, roi.RoiConfig(threshold=0.1), names=mask_names)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-5)
    for i, path in enumerate(masks):
        mask = roi.load_mask(path)
        assert out.pathway[i] == ("full" if mask.mean() >= 0.1 else "crop"), mask_names[i]
        top, left, bottom, right = roi.mask_box(mask)
        box = out.boxes[i]
        assert box[0] <= top and box[1] <= left and bottom <= box[2] and right <= box[3], mask_names[i]
    assert set(out.pathway) == {"full", "crop"}


def _encoder_config(directory, full: bool = False, **fields) -> str:
    """A SigLIP config.json (the tiny demo encoder's, `fields` changed; `full`: as a whole SiglipModel's
    vision_config); the heatmap encoder's checks read nothing else."""
    from vital_jax.models.siglip import SiglipVisionConfig
    from vital_jax.models.siglip.params import config_to_hf_dict

    vision = config_to_hf_dict(SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=112, patch_size=14,
                                                             use_head=False), **fields}))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "siglip", "vision_config": vision, "text_config": {}} if full else vision, f)
    return str(directory)


def test_the_heatmap_encoder_is_the_recorded_one_unless_given_and_a_foreign_one_is_refused(tmp_path, caplog):
    """explain and the probe read only the feature layer from roi_features.json: without --encoder_dir / a run
    roi_encoder_dir there were no heatmaps (silently), and another encoder of the same width gave cosines in
    another feature space."""
    data = tmp_path / "data"
    data.mkdir()
    recorded = _encoder_config(tmp_path / "recorded")

    def record(encoder_dir, dim=32):
        (data / ROI_PROVENANCE_FILE).write_text(json.dumps({"encoder_dir": str(encoder_dir), "dim": dim,
                                                            "feature_layer": "last_block"}))

    record(recorded)
    hint = "--encoder_dir=DIR"
    # None given: the recorded encoder.
    assert roi.heatmap_encoder_dir(str(data), None, hint) == recorded
    assert roi.heatmap_encoder_dir(str(data), "", hint) == recorded
    # The recorded one, or a copy with the same config (a warning: the weights may differ), or the same encoder
    # as a whole SiglipModel.
    assert roi.heatmap_encoder_dir(str(data), recorded, hint) == recorded
    for name, full in (("copy", False), ("full", True)):
        caplog.clear()
        copy = _encoder_config(tmp_path / name, full=full)
        assert roi.heatmap_encoder_dir(str(data), copy, hint) == copy
        assert f"ROI encoder {copy} is not {recorded}" in caplog.text
    # Another architecture, even of the same width: refused, naming what differs and the recorded encoder.
    for name, change, what in (("deeper", dict(num_hidden_layers=3), "num_hidden_layers 3 (recorded: 2)"),
                               ("wider", dict(hidden_size=48, intermediate_size=96), "hidden_size 48 (recorded: 32)"),
                               ("finer", dict(patch_size=16), "patch_size 16 (recorded: 14)"),
                               ("larger", dict(image_size=224), "image_size 224 (recorded: 112)")):
        other = _encoder_config(tmp_path / name, **change)
        with pytest.raises(roi.ConfigError, match=re.escape(what) + ".*" + re.escape(str(recorded))):
            roi.heatmap_encoder_dir(str(data), other, hint)
    # The recorded encoder gone: none given is no heatmaps, with a warning saying how to get them; a given one is
    # checked against the recorded feature width.
    gone = tmp_path / "gone"
    record(gone)
    caplog.clear()
    assert roi.heatmap_encoder_dir(str(data), None, hint) is None
    assert "no heatmaps" in caplog.text and str(gone) in caplog.text and hint in caplog.text
    assert roi.heatmap_encoder_dir(str(data), str(tmp_path / "deeper"), hint) == str(tmp_path / "deeper")
    with pytest.raises(roi.ConfigError, match="hidden_size 48, but the dataset's ROI features .* are 32-dim"):
        roi.heatmap_encoder_dir(str(data), str(tmp_path / "wider"), hint)
    # A dataset from before roi_features.json: a given encoder is used as is; none is no heatmaps, with a warning.
    os.remove(data / ROI_PROVENANCE_FILE)
    assert roi.heatmap_encoder_dir(str(data), str(tmp_path / "wider"), hint) == str(tmp_path / "wider")
    caplog.clear()
    assert roi.heatmap_encoder_dir(str(data), None, hint) is None
    assert f"has no {ROI_PROVENANCE_FILE}" in caplog.text and hint in caplog.text
