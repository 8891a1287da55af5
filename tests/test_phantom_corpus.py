"""The phantom pretraining corpus places a target of several regions where its parts are, not at its centroid;
the ROI encoder's patch labels are each view's class shares, on exactly the views roi.py encodes."""

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import geometry, phantom_corpus, phantoms


def _two_kidney_parts() -> tuple[phantoms.Phantom, dict[str, geometry.MaskGeometry]]:
    size = 96
    image = np.full((size, size), 60, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[60:80, 8:24] = True    # lower left
    mask[60:80, 72:88] = True   # lower right; the whole mask's centroid is in the lower central third
    image[mask] = 160
    phantom = phantoms.Phantom(image=image, masks={"kidney": mask}, modality="CT")
    return phantom, {"kidney": geometry.measure(image, mask)}


def test_report_and_grounding_follow_the_parts():
    phantom, measured = _two_kidney_parts()
    assert measured["kidney"].components == 2
    pairs = phantom_corpus._pairs_for("images/x.png", "x", phantom, measured)
    texts = {p["prompt"]: p["text"] for p in pairs}
    assert texts["Report the kidney."].startswith("kidney: in the lower left and lower right parts,")
    assert texts["What lies in the lower left part of the image?"] == "kidney."
    assert texts["What lies in the lower right part of the image?"] == "kidney."
    assert "What lies in the lower central part of the image?" not in texts


def test_one_region_target_keeps_its_region():
    size = 96
    image = np.full((size, size), 60, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[8:30, 8:30] = True
    image[mask] = 20
    phantom = phantoms.Phantom(image=image, masks={"liver": mask}, modality="CT")
    pairs = phantom_corpus._pairs_for("images/x.png", "x", phantom, {"liver": geometry.measure(image, mask)})
    texts = {p["prompt"]: p["text"] for p in pairs}
    assert texts["Report the liver."] == "liver: in the upper left part, medium, dark."
    assert texts["What lies in the upper left part of the image?"] == "liver."


def test_patch_labels_are_each_cells_class_shares_with_lesions_over_their_organ():
    phantom = next(p for p in (phantoms.make_phantom("CT", 2000, i, 96, "varied") for i in range(20))
                   if "liver tumor" in p.masks)
    shares = phantom_corpus.patch_labels(phantom, 8)
    classes = phantom_corpus.PATCH_CLASSES
    assert shares.shape == (64, len(classes)) and np.allclose(shares.sum(-1), 1.0, atol=1e-6)
    tumor, liver = phantom.masks["liver tumor"], phantom.masks["liver"]
    cells = lambda m: m.reshape(8, 12, 8, 12).mean(axis=(1, 3)).reshape(-1)  # noqa: E731 (96 = 8 x 12)
    np.testing.assert_allclose(shares[:, classes.index("liver tumor")], cells(tumor), atol=1e-6)
    np.testing.assert_allclose(shares[:, classes.index("liver")], cells(liver & ~tumor), atol=1e-6)
    np.testing.assert_allclose(shares[:, 0], cells(~np.any(list(phantom.masks.values()), axis=0)), atol=1e-6)


def test_encoder_views_are_the_roi_pathways_views_with_their_labels():
    from vital_jax.data import roi
    from vital_jax.models.siglip.preprocessing import SiglipPreprocessor

    phantom = phantoms.make_phantom("MRI", 2000, 3, 96, "varied")
    views = phantom_corpus.encoder_views(phantom, 8, padding=0.05)
    assert [name for name, _, _ in views] == ["full"] + [t for t in phantoms.TARGET_TYPES if t in phantom.masks]
    preprocessor = SiglipPreprocessor(112, 112)
    encoder = roi.RoiEncoder(patch_features=None, preprocessor=preprocessor, grid_size=8)
    for name, rgb, shares in views[1:]:
        view = roi.prepare_view(views[0][1], phantom.masks[name], encoder, roi.RoiConfig(threshold=1.0))
        np.testing.assert_array_equal(preprocessor(Image.fromarray(rgb)), view.pixels)  # what roi.py encodes
        assert np.allclose(shares.sum(-1), 1.0, atol=1e-6)
        # The target fills its crop: it is the largest class there, and every padding cell is "other".
        own = shares[:, phantom_corpus.PATCH_CLASSES.index(name)]
        assert own.sum() >= shares[:, 1:].sum(0).max() - 1e-6, name
        assert np.all(shares[~view.valid, 0] > 0.5), name


def test_patch_label_examples_split_phantoms_and_batch_exactly_what_the_preprocessor_gives():
    import ml_collections
    from vital_jax.models.siglip.preprocessing import SiglipPreprocessor

    settings = ml_collections.ConfigDict(dict(seed=2000, phantoms=5, phantom_size=96, modalities=("CT", "MRI"),
                                              layout="varied", val_fraction=0.2, padding=0.05))
    preprocessor = SiglipPreprocessor(112, 112)
    train = phantom_corpus.PatchLabelExamples(settings, "train", 8, preprocessor)
    val = phantom_corpus.PatchLabelExamples(settings, "val", 8, preprocessor)
    stems = lambda e: {i.split("/")[0] for i in e.ids(range(len(e)))}  # noqa: E731
    assert len(stems(train)) == 4 and len(stems(val)) == 1 and not stems(train) & stems(val)
    batch = val.batch([0, 1], [True, False])
    phantom = phantoms.make_phantom("CT", 2000, 4, 96, "varied")
    (_, rgb, shares), (_, crop, _) = phantom_corpus.encoder_views(phantom, 8, 0.05)[:2]
    np.testing.assert_array_equal(batch["pixels"][0], preprocessor(Image.fromarray(rgb)))
    np.testing.assert_array_equal(batch["pixels"][1], preprocessor(Image.fromarray(crop)))
    np.testing.assert_array_equal(batch["targets"][0], shares)
    assert batch["example_valid"].tolist() == [True, False] and batch["record_index"].tolist() == [0, 1]
    with pytest.raises(phantom_corpus.CorpusError, match="'test'"):
        phantom_corpus.PatchLabelExamples(settings, "test", 8, preprocessor)
