"""Ingestion: NIfTI-1/-2 through nibabel in RAS+ order (flipped and permuted storage give the same slices), MSD
slicing, the BiomedParse layout (shared demo and phantoms), and bad inputs each reported with the file's name.
DICOM series are in test_dicom.py."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.medical_files import flip_axis, permute_axes, write_nifti
from vital_jax.data import ingest, phantoms, volumes
from vital_jax.data.ingest import IngestError


# ---------------------------------------------------------------------------------------------------- NIfTI
# A RAS+ affine with anisotropic voxels and an offset: what load_nifti must give back for every storage order.
RAS_AFFINE = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint16, np.int32, np.float64])
def test_nifti_round_trip(tmp_path, version, suffix, dtype):
    data = (np.arange(3 * 4 * 5).reshape(3, 4, 5) % 97).astype(dtype)
    path = write_nifti(str(tmp_path / f"v{suffix}"), data, RAS_AFFINE, version=version)
    volume = volumes.load_nifti(path)
    assert volume.data.dtype == np.float32 and volume.origin == path
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, RAS_AFFINE, atol=1e-6)
    labels = volumes.load_nifti(path, labels=True)
    assert labels.data.dtype == np.int64
    np.testing.assert_array_equal(labels.data, data.astype(np.int64))


def test_nifti_applies_slope_and_intercept(tmp_path):
    stored = np.array([[[0, 1], [2, 3]]], np.int16)
    path = write_nifti(str(tmp_path / "v.nii"), stored, slope=2.0, inter=-1024.0)
    np.testing.assert_array_equal(volumes.load_nifti(path).data, stored * 2.0 - 1024.0)


def _anatomy():
    """A RAS-ordered volume with a single bright voxel on the patient's right, anterior, in the top slice."""
    data = np.zeros((5, 6, 3), np.int16)
    data[4, 5, 2] = 1000
    data[1, 2, 0] = 7  # a second marker: left, posterior, bottom slice
    return data, RAS_AFFINE


@pytest.mark.parametrize("store", [
    "RAS", "LAS (i flipped)", "LPS (i, j flipped, as DICOM)", "RPI (j, k flipped)", "SRA (axes permuted)",
    "ILP (permuted and flipped)"])
@pytest.mark.parametrize("version, suffix", [(1, ".nii"), (2, ".nii.gz")])
def test_flipped_or_permuted_storage_gives_the_same_canonical_slices(tmp_path, store, version, suffix):
    data, affine = _anatomy()
    steps = {"RAS": [], "LAS (i flipped)": [("flip", 0)], "LPS (i, j flipped, as DICOM)": [("flip", 0), ("flip", 1)],
             "RPI (j, k flipped)": [("flip", 1), ("flip", 2)], "SRA (axes permuted)": [("perm", (2, 0, 1))],
             "ILP (permuted and flipped)": [("perm", (2, 0, 1)), ("flip", 0), ("flip", 1), ("flip", 2)]}[store]
    for kind, arg in steps:
        data, affine = flip_axis(data, affine, arg) if kind == "flip" else permute_axes(data, affine, arg)
    if store != "RAS":
        assert nib.aff2axcodes(affine) != ("R", "A", "S")
    volume = volumes.load_nifti(write_nifti(str(tmp_path / f"v{suffix}"), data, affine, version=version))
    reference, reference_affine = _anatomy()
    np.testing.assert_array_equal(volume.data, reference)
    np.testing.assert_allclose(volume.affine, reference_affine, atol=1e-5)
    slices = volumes.axial_slices(volume.data)
    # Radiological display: the right-anterior voxel of the top slice is the image's top-left pixel; the
    # left-posterior marker of the bottom slice sits right of centre, in the lower half.
    assert slices.shape == (3, 6, 5) and slices[2, 0, 0] == 1000 and slices[0, 6 - 1 - 2, 5 - 1 - 1] == 7


def test_nifti_errors_name_the_file(tmp_path):
    path = write_nifti(str(tmp_path / "v.nii.gz"), np.zeros((4, 4, 4), np.int16))
    raw = gzip.decompress(open(path, "rb").read())
    (tmp_path / "trunc.nii").write_bytes(raw[:-10])
    (tmp_path / "garbage.nii").write_bytes(b"definitely not a NIfTI header" * 20)
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    write_nifti(str(tmp_path / "flat.nii"), np.zeros((4, 4), np.int16))
    write_nifti(str(tmp_path / "half.nii"), np.full((2, 2, 2), 0.5, np.float32))
    # NaN outside the body, as preprocessed MR often has: the windowing would make them 0 and a percentile-normalised
    # slice all black.
    nan_outside = np.ones((4, 4, 4), np.float32)
    nan_outside[0, :, :], nan_outside[1, 0, 0] = np.nan, np.inf
    write_nifti(str(tmp_path / "nan.nii.gz"), nan_outside)
    for name, fragment, labels in [
            ("trunc.nii", "cannot read the voxel data", False), ("garbage.nii", "not a readable NIfTI", False),
            ("bad.nii.gz", "not a readable NIfTI", False), ("absent.nii", "file not found", False),
            ("flat.nii", "expected a 3-D volume", False), ("half.nii", "non-integer values", True),
            ("nan.nii.gz", "17 of 64 voxels are NaN or infinite", False)]:
        with pytest.raises(volumes.VolumeError, match=fragment) as e:
            volumes.load_nifti(str(tmp_path / name), labels=labels)
        assert name in str(e.value)


def test_mask_grid_must_match_the_image_and_errors_name_both_files(tmp_path):
    data, affine = _anatomy()
    image = volumes.load_nifti(write_nifti(str(tmp_path / "image.nii"), data, affine))
    # The same grid stored flipped is the same grid.
    flipped = volumes.load_nifti(write_nifti(str(tmp_path / "flipped.nii"), *flip_axis(data, affine, 0)), True)
    volumes.check_same_grid(image, flipped)
    shifted = affine.copy()
    shifted[0, 3] += 0.7  # one voxel to the right
    for name, mask_data, mask_affine, fragment in [
            ("small.nii", data[:4], affine, r"mask shape \(4, 6, 3\) differs"),
            ("shifted.nii", data, shifted, "mask grid differs"),
            ("coarse.nii", data, affine @ np.diag([2.0, 1.0, 1.0, 1.0]), "mask grid differs")]:
        mask = volumes.load_nifti(write_nifti(str(tmp_path / name), mask_data, mask_affine), True)
        with pytest.raises(volumes.VolumeError, match=fragment) as e:
            volumes.check_same_grid(image, mask)
        assert name in str(e.value) and "image.nii" in str(e.value)
    volumes.check_same_grid(image, volumes.load_nifti(str(tmp_path / "shifted.nii"), True), translation=False)


# ---------------------------------------------------------------------------------------------------- MSD
def _msd_task(root, modality="CT", labels=None):
    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    labels = labels or {"0": "background", "1": "liver", "2": "cancer"}
    cases = []
    for c in range(2):
        hu = np.full((40, 30, 6), -1000, np.int16)
        hu[5:35, 5:25, :] = 40 + 10 * c
        label = np.zeros((40, 30, 6), np.uint8)
        label[10:30, 8:20, 1:5] = 1            # 240 px on slices 1..4
        label[12:20, 10:20, 2] = 2             # 80 px: below the threshold
        label[12:24, 10:20, 3] = 2             # 120 px
        write_nifti(str(root / f"imagesTr/case_{c}.nii.gz"), ((hu + 1024) // 2).astype(np.int16), slope=2.0,
                    inter=-1024.0)
        write_nifti(str(root / f"labelsTr/case_{c}.nii.gz"), label, version=2)
        cases.append({"image": f"./imagesTr/case_{c}.nii.gz", "label": f"./labelsTr/case_{c}.nii.gz"})
    meta = {"name": "Liver", "modality": {"0": modality}, "labels": labels, "training": cases}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_msd_keeps_slices_with_enough_target_pixels(tmp_path):
    _msd_task(tmp_path)
    images = list(ingest.iter_msd(str(tmp_path)))
    assert [im.image_id for im in images] == [f"case_{c}_z{z:03d}" for c in range(2) for z in (1, 2, 3, 4)]
    names = {im.image_id: [t.name for t in im.targets] for im in images}
    assert names["case_0_z002"] == ["liver"] and names["case_0_z003"] == ["liver", "cancer"]
    first = images[0]
    assert first.modality == "CT" and first.source == "MSD Liver" and first.image.shape == (30, 40, 3)
    liver, = first.targets
    assert liver.target_type == "organ" and liver.normal_anatomy and liver.mask.sum() == 240
    cancer = images[2].targets[1]
    assert cancer.target_type == "lesion" and not cancer.normal_anatomy and cancer.mask.sum() == 120
    # Window level 40 width 400: air is 0, 40 HU is mid-grey (127.5 -> 128), 50 HU is 134.
    assert first.image[0, 0, 0] == 0 and first.image[15, 15, 0] == 128
    assert images[4].image[15, 15, 0] == round((50 + 160) / 400 * 255)


def test_an_msd_organ_mask_includes_the_tumour_labelled_inside_it(tmp_path):
    os.makedirs(tmp_path / "imagesTr")
    os.makedirs(tmp_path / "labelsTr")
    label = np.zeros((40, 40, 1), np.uint8)
    label[5:30, 5:30, 0] = 1           # pancreas
    label[12:20, 12:20, 0] = 2         # its tumour, painted over it: 64 px
    label[33:38, 33:38, 0] = 2         # a lesion outside the organ: 25 px
    write_nifti(str(tmp_path / "imagesTr/p_1.nii.gz"), np.zeros(label.shape, np.int16))
    write_nifti(str(tmp_path / "labelsTr/p_1.nii.gz"), label)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "Pancreas", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "training": [{"image": "./imagesTr/p_1.nii.gz", "label": "./labelsTr/p_1.nii.gz"}]}))
    pancreas, = [t for t in next(ingest.iter_msd(str(tmp_path), min_mask_pixels=50)).targets if t.name == "pancreas"]
    slice_ = volumes.axial_slices(label)[0]
    assert pancreas.mask.sum() == 25 * 25
    assert pancreas.mask[slice_ == 1].all() and (pancreas.mask & (slice_ == 2)).sum() == 64


def test_msd_mr_and_errors(tmp_path):
    _msd_task(tmp_path / "mr", modality="T2")
    assert {im.modality for im in ingest.iter_msd(str(tmp_path / "mr"), max_cases=1)} == {"MRI"}
    _msd_task(tmp_path / "pet", modality="PET")
    with pytest.raises(IngestError, match="dataset.json: unknown modality 'PET'"):
        list(ingest.iter_msd(str(tmp_path / "pet")))
    os.remove(tmp_path / "mr/labelsTr/case_0.nii.gz")
    with pytest.raises(IngestError, match="case_0.nii.gz: file not found"):
        list(ingest.iter_msd(str(tmp_path / "mr")))
    (tmp_path / "mr/dataset.json").write_text("{nope")
    with pytest.raises(IngestError, match="dataset.json: malformed JSON"):
        list(ingest.iter_msd(str(tmp_path / "mr")))


@pytest.mark.parametrize("field, value, message", [
    ("labels", ["background", "liver"], r"field 'labels': expected a mapping label value -> target name"),
    ("labels", {"0": "background", "one": "liver"}, r"field 'labels': key 'one' is not a label value"),
    ("labels", {"1": ["liver"]}, r"field 'labels': the target name of label '1' must be a non-empty string"),
    ("modality", {"0": 1}, r"field 'modality' must map channels to modality names"),
    ("training", "imagesTr", r"field 'training' must be a list .* got str"),
    ("training", [{"label": "./labelsTr/case_0.nii.gz"}], r"field 'training' entry 0 needs 'image'"),
    ("training", ["./imagesTr/case_0.nii.gz"], r"field 'training' entry 0 must be an object"),
])
def test_wrong_field_types_in_msd_dataset_json_are_named(tmp_path, field, value, message):
    _msd_task(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(IngestError, match=r"dataset\.json: " + message):
        list(ingest.iter_msd(str(tmp_path)))


def test_a_label_map_with_keys_and_names_swapped_is_named():
    with pytest.raises(IngestError, match=r"/data/ct: label names \{'liver': '1'\}: key 'liver' is not a label value"):
        list(ingest.iter_dicom("/data/ct", {"liver": "1"}))
    assert ingest.label_names({"0": "background", "1": "liver", 2: "spleen"}, "x") == {1: "liver", 2: "spleen"}


def test_msd_label_in_another_voxel_order_aligns_and_a_grid_mismatch_names_both_files(tmp_path):
    _msd_task(tmp_path)
    reference = list(ingest.iter_msd(str(tmp_path), max_cases=1))
    label_path = str(tmp_path / "labelsTr/case_0.nii.gz")
    label = nib.load(label_path)
    stored = np.asarray(label.dataobj)  # read now: the file is rewritten below
    data, affine = flip_axis(*permute_axes(stored, label.affine, (2, 0, 1)), 1)
    write_nifti(label_path, data, affine)
    again = list(ingest.iter_msd(str(tmp_path), max_cases=1))
    assert [im.image_id for im in again] == [im.image_id for im in reference]
    for a, b in zip(again, reference):
        assert all(np.array_equal(s.mask, t.mask) for s, t in zip(a.targets, b.targets))
    write_nifti(label_path, stored, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(IngestError, match="mask grid differs") as e:
        list(ingest.iter_msd(str(tmp_path)))
    assert "labelsTr/case_0.nii.gz" in str(e.value) and "imagesTr/case_0.nii.gz" in str(e.value)


# -------------------------------------------------------------------------------------------- BiomedParse
def test_shared_biomedparse_demo_ingests_every_mask(shared_data_dir):
    root = os.path.join(shared_data_dir, "biomedparse_demo")
    images = list(ingest.iter_biomedparse(os.path.join(root, "demo"), os.path.join(root, "demo_mask")))
    assert len(images) == 21 and sum(len(im.targets) for im in images) == 62
    assert {im.modality for im in images} == {"CT", "MRI", "X-Ray", "pathology", "ultrasound", "fundus",
                                             "endoscope", "dermoscopy"}
    by_id = {im.image_id: im for im in images}
    brain = by_id["09_MRI-FLAIR_brain"]
    assert brain.modality == "MRI" and brain.site == "brain" and brain.image.shape == (1024, 1024, 3)
    assert brain.image.dtype == np.uint8
    assert [t.name for t in brain.targets] == ["lower-grade glioma"] and brain.targets[0].target_type == "lesion"
    kinds = {t.name: t.target_type for im in images for t in im.targets}
    assert kinds["liver"] == "organ" and kinds["kidney cyst"] == "lesion" and kinds["optic disc"] == "other"
    assert not any(t.normal_anatomy for im in images for t in im.targets)


def test_phantom_folder_ingests_with_the_same_code(tmp_path):
    image_dir, mask_dir = phantoms.write_phantom_folder(str(tmp_path), count=3, seed=0, size=96)
    images = list(ingest.iter_biomedparse(image_dir, mask_dir, source="phantom", normal_anatomy=True))
    assert [im.modality for im in images] == list(phantoms.PHANTOM_MODALITIES)
    for im in images:
        ph = phantoms.make_phantom(im.modality, 0, images.index(im), size=96)
        assert np.array_equal(im.image[..., 0], ph.image)
        for t in im.targets:
            assert np.array_equal(t.mask, ph.masks[t.name]) and t.target_type == phantoms.TARGET_TYPES[t.name]
            assert t.normal_anatomy == (t.target_type == "organ")


def _layout(tmp_path):
    image_dir, mask_dir = tmp_path / "img", tmp_path / "img_mask"
    os.makedirs(image_dir)
    os.makedirs(mask_dir)
    Image.new("RGBA", (20, 16), (10, 20, 30, 255)).save(image_dir / "a_CT_liver.png")
    mask = np.zeros((16, 20), np.uint8)
    mask[4:8, 5:9] = 255
    Image.fromarray(mask).save(mask_dir / "a_CT_liver_liver+tumor.png")
    return image_dir, mask_dir


def test_rgba_is_converted_and_names_parsed(tmp_path):
    image_dir, mask_dir = _layout(tmp_path)
    im, = ingest.iter_biomedparse(str(image_dir), str(mask_dir))
    assert im.image.shape == (16, 20, 3) and tuple(im.image[0, 0]) == (10, 20, 30)
    assert im.targets[0].name == "liver tumor" and im.targets[0].mask.sum() == 16


@pytest.mark.parametrize("break_it, fragment, culprit", [
    (lambda i, m: Image.new("L", (21, 16)).save(m / "a_CT_liver_liver+tumor.png"),
     "differs from its image", "a_CT_liver_liver+tumor.png"),
    (lambda i, m: Image.new("L", (20, 16)).save(m / "a_CT_liver_liver+tumor.png"),
     "empty mask", "a_CT_liver_liver+tumor.png"),
    (lambda i, m: Image.fromarray(np.full((16, 20), 7, np.uint8)).save(m / "a_CT_liver_liver+tumor.png"),
     "not a binary mask", "a_CT_liver_liver+tumor.png"),
    (lambda i, m: (i / "a_CT_liver.png").write_bytes(b"\x89PNG garbage"), "corrupt or unreadable image",
     "a_CT_liver.png"),
    (lambda i, m: os.rename(i / "a_CT_liver.png", i / "a_PET_liver.png") or os.rename(
        m / "a_CT_liver_liver+tumor.png", m / "a_PET_liver_tumor.png"), "unknown modality 'PET'", "a_PET_liver.png"),
    (lambda i, m: Image.new("L", (20, 16)).save(m / "b_CT_liver_liver.png"), "no image b_CT_liver",
     "b_CT_liver_liver.png"),
    (lambda i, m: os.remove(i / "a_CT_liver.png") or Image.fromarray(np.zeros((16, 20), np.float32)).save(
        i / "a_CT_liver.tif"), "image mode 'F'", "a_CT_liver.tif"),
    (lambda i, m: Image.new("RGB", (20, 4)).save(i / "a_CT_liver.png"), "image of 20x4 pixels is too small",
     "a_CT_liver.png"),
    (lambda i, m: Image.new("RGB", (20, 16)).save(i / "a_CT_liver.jpg"), "two images named 'a_CT_liver'",
     "a_CT_liver.jpg"),
])
def test_bad_inputs_name_the_file(tmp_path, break_it, fragment, culprit):
    image_dir, mask_dir = _layout(tmp_path)
    break_it(image_dir, mask_dir)
    with pytest.raises(IngestError, match=fragment) as e:
        list(ingest.iter_biomedparse(str(image_dir), str(mask_dir)))
    assert culprit in str(e.value)


def test_parse_modality_and_classify_target():
    assert ingest.parse_modality("MRI-T1-Gd", "f") == "MRI" and ingest.parse_modality("X-Ray", "f") == "X-Ray"
    assert ingest.parse_modality("OCT", "f") == "OCT" and ingest.parse_modality("Ultrasound", "f") == "ultrasound"
    with pytest.raises(IngestError, match="f: unknown modality 'PET'"):
        ingest.parse_modality("PET", "f")
    assert [ingest.classify_target(n) for n in ("left kidney", "non-enhancing tumor", "hepatic vessel")] == [
        "organ", "lesion", "other"]
