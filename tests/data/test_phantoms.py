"""Phantoms: deterministic under a seed, masks consistent with the anatomy, modality-specific appearance, layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import phantoms


@pytest.mark.parametrize("modality", phantoms.PHANTOM_MODALITIES)
def test_phantom_is_deterministic_under_its_seed(modality):
    a, b = phantoms.make_phantom(modality, seed=3, index=1), phantoms.make_phantom(modality, seed=3, index=1)
    c = phantoms.make_phantom(modality, seed=4, index=1)
    assert np.array_equal(a.image, b.image) and a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("index", range(6))
def test_masks_are_consistent(index):
    modality = phantoms.PHANTOM_MODALITIES[index % 3]
    p = phantoms.make_phantom(modality, seed=0, index=index, size=192)
    assert p.image.dtype == np.uint8 and p.image.shape == (192, 192)
    assert {"liver", "spleen", "kidney"} <= set(p.masks) <= set(phantoms.TARGET_TYPES)
    for name, mask in p.masks.items():
        assert mask.shape == p.image.shape and mask.dtype == bool and mask.sum() > 20, name
    assert not (p.masks["liver"] & p.masks["spleen"]).any() and not (p.masks["liver"] & p.masks["kidney"]).any()
    if "liver tumor" in p.masks:
        assert not (p.masks["liver tumor"] & ~p.masks["liver"]).any()
    if "kidney cyst" in p.masks:
        assert not (p.masks["kidney cyst"] & ~p.masks["kidney"]).any()
    # Image-space layout: the liver lies in the image's left half, the spleen in its right half.
    col = lambda m: np.nonzero(m)[1].mean()  # noqa: E731
    assert col(p.masks["liver"]) < p.image.shape[1] / 2 < col(p.masks["spleen"])


def _first_with(modality, target):
    for index in range(20):
        p = phantoms.make_phantom(modality, seed=0, index=index)
        if target in p.masks:
            return p
    raise AssertionError(f"no {modality} phantom with a {target} in 20 tries")


def test_lesion_contrast_follows_the_modality():
    """Tumor hypodense on CT, cyst anechoic on ultrasound and bright (fluid) on T2-like MRI."""
    ct = _first_with("CT", "liver tumor")
    healthy = ct.masks["liver"] & ~ct.masks["liver tumor"]
    assert ct.image[ct.masks["liver tumor"]].mean() < ct.image[healthy].mean() - 10
    us = _first_with("ultrasound", "kidney cyst")
    assert us.image[us.masks["kidney cyst"]].mean() < 0.5 * us.image[us.masks["liver"]].mean()
    mri = _first_with("MRI", "kidney cyst")
    assert mri.image[mri.masks["kidney cyst"]].mean() > mri.image[mri.masks["liver"]].mean() + 40


def test_ultrasound_has_speckle_and_ct_is_windowed():
    ct, us = phantoms.make_phantom("CT", 0, 0), phantoms.make_phantom("ultrasound", 0, 0)
    organ = lambda p: p.image[p.masks["liver"]].astype(float)  # noqa: E731
    assert organ(us).std() / organ(us).mean() > 2 * organ(ct).std() / organ(ct).mean()
    # Air (-1000 HU) is below the soft-tissue window: the CT corners are black.
    assert ct.image[:8, :8].max() == 0


def test_written_folder_has_the_biomedparse_layout(tmp_path):
    image_dir, mask_dir = phantoms.write_phantom_folder(str(tmp_path), count=3, seed=1, size=96)
    images = sorted(os.listdir(image_dir))
    assert images == [phantoms.phantom_stem(i, m) + ".png" for i, m in enumerate(phantoms.PHANTOM_MODALITIES)]
    for name in sorted(os.listdir(mask_dir)):
        stem, target = name[:-4].rsplit("_", 1)
        assert stem + ".png" in images and " " not in name
        assert target.replace("+", " ") in phantoms.TARGET_TYPES
        mask = np.asarray(Image.open(os.path.join(mask_dir, name)))
        assert set(np.unique(mask)) == {0, 255}
        assert mask.shape == np.asarray(Image.open(os.path.join(image_dir, stem + ".png"))).shape
    assert any("liver+tumor" in n for n in os.listdir(mask_dir)) or any(
        "kidney+cyst" in n for n in os.listdir(mask_dir))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="'PET'"):
        phantoms.make_phantom("PET", 0)
    with pytest.raises(ValueError, match="too small"):
        phantoms.make_phantom("CT", 0, size=32)
