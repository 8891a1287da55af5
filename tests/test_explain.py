"""The explanation figures (Figure 3 heatmaps and summary, Figure 11 step similarity) on synthetic inputs; the
model-driven path is exercised end to end in test_trained_run.py."""

import os

import numpy as np
import pytest

from vital_jax import explain
from vital_jax.eval import figures

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def _has_format(path: str, fmt: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return b"<svg" in head if fmt == "svg" else head.startswith(MAGIC[fmt])


def _inputs(k: int = 3):
    rgb = np.random.RandomState(0).randint(0, 256, (48, 64, 3)).astype(np.uint8)
    maps = np.random.RandomState(1).uniform(-0.1, 0.3, (k, 4, 4))
    maps[1, 0, 3] = 0.8                                              # one hot patch, top right, in step 2
    return rgb, maps


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_write_heatmaps_writes_each_step_and_the_summary_in_the_requested_format(tmp_path, fmt):
    rgb, maps = _inputs()
    paths = explain.write_heatmaps(str(tmp_path), rgb, maps, "Where is it?", "top right", ["a", "b", "c"], fmt)
    assert paths == [str(tmp_path / f"step_{i}.{fmt}") for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == sorted([f"step_{i}.{fmt}" for i in (1, 2, 3)] + [f"summary.{fmt}",
                                                                                           explain.HEATMAPS_FILE])
    for name in os.listdir(tmp_path):
        if name != explain.HEATMAPS_FILE:
            assert _has_format(str(tmp_path / name), fmt), name
    saved = np.load(tmp_path / explain.HEATMAPS_FILE)   # the numbers the figures draw
    assert saved.dtype == np.float32 and np.array_equal(saved, maps.astype(np.float32))


def test_step_figure_overlays_the_map_on_the_image_with_a_colour_bar():
    rgb, maps = _inputs()
    fig = figures.step_figure(rgb, maps[1], "z2: the hot patch", value_range=(-0.1, 0.8))
    assert len(fig.axes) == 2                                        # the overlay and its colour bar
    ax, bar = fig.axes
    photo, heat = ax.images
    assert np.array_equal(photo.get_array(), rgb)
    assert heat.get_clim() == (-0.1, 0.8) and 0 < heat.get_alpha() < 1
    assert heat.get_extent() == [-0.5, 63.5, 47.5, -0.5]             # the 4x4 map covers the whole image
    assert bar.get_ylim() == pytest.approx((-0.1, 0.8)) and "cosine" in bar.get_ylabel()
    assert figures.step_figure(rgb, maps[0], "z1").axes[0].images[1].get_clim() == (maps[0].min(), maps[0].max())


def test_summary_shares_one_colour_scale_and_wraps_captions_at_words():
    rgb, maps = _inputs()
    texts = ["the liver lies in the upper left part of the image near the edge", "liver", "left"]
    question = "Where is the liver in this image, and on which side of the body does it lie?"
    fig = figures.summary_figure(rgb, maps, question, "left upper quadrant", texts)
    assert len(fig.axes) == 1 + 3 + 1                                # image, K heatmaps, one colour bar
    heat_clims = {ax.images[1].get_clim() for ax in fig.axes[1:4]}
    assert heat_clims == {(maps.min(), maps.max())}
    for ax, expected in zip(fig.axes[:4], [f"Q: {question} A: left upper quadrant"] +
                            [f"z{i}: {t}" for i, t in enumerate(texts, start=1)]):
        lines = ax.get_title().split("\n")
        assert all(len(line) <= figures.CAPTION_WIDTH for line in lines)
        assert " ".join(lines).split() == expected.split()           # every word whole, nothing left out
    assert len(fig.axes[0].get_title().split("\n")) > 1


def test_the_ground_truth_mask_is_figure_12s_last_panel_and_each_heatmap_is_scored_against_it(tmp_path):
    from PIL import Image

    rgb, maps = _inputs()
    mask = np.zeros(rgb.shape[:2], bool)
    mask[:24, 32:] = True                                            # the top-right quarter: cells (0-1, 2-3)
    fig = figures.summary_figure(rgb, maps, "Where is it?", "top right", ["a", "b", "c"], mask=mask)
    assert len(fig.axes) == 1 + 3 + 1 + 1                            # image, K heatmaps, ground truth, colour bar
    truth = fig.axes[4]
    assert truth.get_title() == "ground truth" and np.array_equal(truth.images[0].get_array(), rgb)
    assert np.array_equal(~np.ma.getmaskarray(truth.images[1].get_array()), mask)
    inside = np.zeros((4, 4), bool)
    inside[:2, 2:] = True
    scores = explain.mask_agreement(maps, mask)
    assert [s["peak_in_mask"] for s in scores] == [bool(inside[np.unravel_index(np.argmax(m), m.shape)])
                                                   for m in maps]
    assert scores[1]["peak_in_mask"]                                 # the hot patch of step 2 is in the region
    for s, m in zip(scores, maps):
        assert s["mean_inside"] == pytest.approx(m[inside].mean()) and s["mean_outside"] == pytest.approx(
            m[~inside].mean())
        assert s["mask_cells"] == "half covered"
    # A lesion smaller than half of any cell is scored on the cell it covers most (no cell was ever inside, so
    # the peak could never be in it).
    speck = np.zeros_like(mask)
    speck[0, -1] = True
    [small] = explain.mask_agreement(maps[1:2], speck)
    assert small["mask_cells"] == "best covered" and small["peak_in_mask"] == (
        np.unravel_index(np.argmax(maps[1]), maps[1].shape) == (0, 3))
    assert small["mean_inside"] == pytest.approx(maps[1][0, 3])
    # ... also beside a larger region (by the whole mask's coverage it was in no cell: a peak on it missed).
    both = mask.copy()
    both[-1, 0] = True                                               # a one-pixel lesion in the bottom-left cell
    peak_there = np.zeros_like(maps[1])
    peak_there[3, 0] = 1.0
    [second] = explain.mask_agreement(peak_there[None], both)
    assert second["peak_in_mask"] and second["mask_cells"] == "best covered"
    with pytest.raises(ValueError, match="the mask is empty"):
        explain.mask_agreement(maps, np.zeros_like(mask))
    # A mask of another size is refused, naming both files.
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match=r"--mask: .*mask.png: empty mask"):  # nothing to score a heatmap against
        explain.check_mask(str(tmp_path / "mask.png"), str(tmp_path / "image.png"))
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match=r"--mask=.*mask.png: 10x10 pixels, the image .*image.png 64x48"):
        explain.check_mask(str(tmp_path / "mask.png"), str(tmp_path / "image.png"))
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert np.array_equal(explain.check_mask(str(tmp_path / "mask.png"), str(tmp_path / "image.png")), mask)


def test_similarity_figure_is_titled_with_its_fixed_range():
    matrix = np.array([[1.0, 0.2, np.nan], [0.2, 1.0, -0.3], [np.nan, -0.3, 1.0]])
    fig = figures.similarity_figure(matrix, "Latent step similarity (test, 6 records)")
    ax, bar = fig.axes
    assert ax.images[0].get_clim() == (-1.0, 1.0) and bar.get_ylim() == (-1.0, 1.0)
    assert ax.get_title().startswith("Latent step similarity (test, 6 records)") and "-1 to 1" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["z1", "z2", "z3"]
    assert [t.get_text() for t in ax.texts].count("n/a") == 2


def test_heatmap_range_of_a_constant_map_is_not_empty():
    lo, hi = figures.heatmap_range(np.full((2, 3, 3), 0.4))
    assert lo < 0.4 < hi


def test_dataset_mode_answers_with_the_k_it_is_given(tmp_path, monkeypatch):
    """explain --data_dir --latent_steps=2 gave the K_max x K_max matrix of K_max steps: the K was ignored."""
    import json
    import types

    from vital_jax import inference
    from vital_jax.data.records import RECORDS_FILE, Record, write_records

    asked = []

    class FakePredictor:
        def __init__(self, run, batch_size):
            pass

        def answer(self, images, questions, latent_steps):
            asked.append(latent_steps)
            z = np.random.RandomState(len(asked)).normal(size=(len(images), latent_steps, 8))
            return ["yes"] * len(images), z, None

    monkeypatch.setattr(inference, "Predictor", FakePredictor)
    records = [Record(id=f"r{i}", image="a.png", mask="m.png", question="Is it there?", answer="Yes.",
                      reasoning_chain=("It is there.",), latent_steps=1, question_type="yes_no", target="liver",
                      target_type="organ", modality="CT", source="phantom", split="test") for i in range(5)]
    write_records(str(tmp_path / RECORDS_FILE), records)
    run = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(k_max=4)))
    matrix = explain.explain_dataset(run, str(tmp_path), str(tmp_path / "out"), latent_steps=2)
    assert asked == [2, 2] and matrix.shape == (2, 2)
    assert json.loads((tmp_path / "out" / "step_similarity.json").read_text())["latent_steps"] == 2
    assert explain.explain_dataset(run, str(tmp_path), str(tmp_path / "out")).shape == (4, 4)   # default: K_max
    # A refused K leaves the results as they were; a single-image explanation's files (and this figure in another
    # format) are removed by the next dataset explanation, other files kept.
    for name in ("explanation.json", "step_1.png", "summary.pdf", "notes.txt"):
        (tmp_path / "out" / name).write_text("earlier")
    with pytest.raises(ValueError, match="1..K_max=4"):
        explain.explain_dataset(run, str(tmp_path), str(tmp_path / "out"), latent_steps=0)
    assert (tmp_path / "out" / "explanation.json").exists()
    explain.explain_dataset(run, str(tmp_path), str(tmp_path / "out"), figure_format="pdf")
    assert sorted(os.listdir(tmp_path / "out")) == ["notes.txt", "step_similarity.json", "step_similarity.pdf"]


def _roi_dataset(root, rows):
    """records.jsonl + the three ROI arrays: rows = (id, split, image, roi_index); ROI feature r is the r-th unit
    vector, so a latent state equal to it is nearest that row."""
    from vital_jax.data import records as records_lib

    records = [records_lib.Record(id=rid, image=image, mask=f"masks/{rid}.png", question="Where is the liver?",
                                  answer="left", reasoning_chain=("It is there.",), latent_steps=1,
                                  question_type="location_choice", target=f"organ of {rid}", target_type="organ",
                                  modality="CT", source="phantom", split=split, roi_index=row)
               for rid, split, image, row in rows]
    records_lib.write_records(str(root / records_lib.RECORDS_FILE), records)
    n = max(row for *_, row in rows) + 1
    np.save(root / records_lib.ROI_FEATURES_FILE, np.eye(n, 8, dtype=np.float32))
    np.save(root / records_lib.ROI_TOP_PATCH_IDS_FILE, np.zeros((n, records_lib.ROI_TOP_PATCHES), np.int32))
    np.save(root / records_lib.ROI_TOP_PATCH_SCORES_FILE, np.zeros((n, records_lib.ROI_TOP_PATCHES), np.float32))


def test_nearest_rois_come_from_the_training_split_less_the_explained_images_own(tmp_path, monkeypatch):
    """The bank was every ROI row (train, val, test): explaining a test record retrieved its own ground-truth
    region; and a training image's own rows were retrieved as its neighbours."""
    import types

    import ml_collections

    from vital_jax.vital import interpret

    # Rows 0, 1 train (images a, b), 2 val (c), 3 test (d, two records).
    _roi_dataset(tmp_path, [("t0", "train", "images/a.png", 0), ("t1", "train", "images/b.png", 1),
                            ("v0", "val", "images/c.png", 2), ("s0", "test", "images/d.png", 3),
                            ("s1", "test", "images/d.png", 3)])
    monkeypatch.setattr(interpret, "project_latents", lambda model, params, z: z)  # VP(z) = z
    run = types.SimpleNamespace(paths=types.SimpleNamespace(data_dir=str(tmp_path)), model=None, params=None,
                                config=ml_collections.ConfigDict({"data": {"train_split": "train"}}))
    eye = np.eye(4, 8, dtype=np.float32)
    # Explaining test image d with z_1 = its own ROI feature, z_2 = the val one, a little of row 1 in each.
    z = (eye[[3, 2]] + 0.5 * eye[1])[None]
    bank, near = explain.roi_neighbours(run, z, 3, str(tmp_path / "images" / "d.png"))
    assert bank == {"split": "train", "roi_rows": 2, "excluded_image_rows": 0}
    for step in near:
        assert [n["roi_row"] for n in step] == [1, 0]
        assert [n["record"] for n in step] == ["t1", "t0"] and {n["split"] for n in step} == {"train"}
    # Explaining training image a: its own row 0 is not retrieved, however close.
    bank, near = explain.roi_neighbours(run, eye[[0]][None], 3, str(tmp_path / "images" / ".." / "images" / "a.png"))
    assert bank == {"split": "train", "roi_rows": 1, "excluded_image_rows": 1}
    assert [n["roi_row"] for n in near[0]] == [1]
    # ... nor when the image is given as a copy under another path (it was excluded by path only).
    os.makedirs(tmp_path / "images")
    for name, content in (("a.png", b"image a"), ("b.png", b"image b")):
        (tmp_path / "images" / name).write_bytes(content)
    (tmp_path / "elsewhere.png").write_bytes(b"image a")
    bank, near = explain.roi_neighbours(run, eye[[0]][None], 3, str(tmp_path / "elsewhere.png"))
    assert bank["excluded_image_rows"] == 1 and [n["roi_row"] for n in near[0]] == [1]
    # The run's own training split names the bank.
    run.config.data.train_split = "val"
    bank, near = explain.roi_neighbours(run, eye[[3]][None], 3, str(tmp_path / "images" / "d.png"))
    assert bank["split"] == "val" and [n["record"] for n in near[0]] == ["v0"]
    # Nothing left to retrieve from: empty lists, and the bank says why.
    bank, near = explain.roi_neighbours(run, eye[[2, 3]][None], 3, str(tmp_path / "images" / "c.png"))
    assert bank == {"split": "val", "roi_rows": 0, "excluded_image_rows": 1} and near == [[], []]
    assert explain.roi_neighbours(run, z, 0, str(tmp_path / "images" / "d.png")) is None


def test_a_rerun_into_the_same_folder_leaves_none_of_the_earlier_explanations_files(tmp_path):
    """K = 4 then K = 2 into one --out left step_3 / step_4 (another image's) beside the new heatmaps.npy."""
    out = tmp_path / "explain"
    out.mkdir()
    earlier = ["explanation.json", "heatmaps.npy", "step_1.png", "step_4.png", "step_12.svg", "summary.pdf",
               "step_similarity.png"]
    theirs = ["notes.txt", "step_x.png", "summary.txt"]
    for name in earlier + theirs:
        (out / name).write_text("x")
    assert explain.clear_previous_explanation(str(out)) == sorted(earlier)
    assert sorted(os.listdir(out)) == sorted(theirs)
    assert explain.clear_previous_explanation(str(tmp_path / "none")) == []


def test_covered_cells_of_a_tiny_mask_is_its_best_cell_only():
    """An absolute tolerance took every cell when the largest coverage was below it (one pixel of a huge image)."""
    from vital_jax.data.roi import covered_cells

    coverage = np.array([[2.5e-7, 0.0], [0.0, 0.0]])
    assert covered_cells(coverage).sum() == 1 and covered_cells(coverage)[0, 0]
