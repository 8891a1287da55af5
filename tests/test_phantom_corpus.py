"""The phantom pretraining corpus places a target of several regions where its parts are, not at its centroid."""

import numpy as np

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
