"""Ingestion: the NIfTI reader, MSD slicing and orientation, the BiomedParse layout (shared demo and phantoms),
and bad inputs each reported with the file's name."""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import ingest, nifti, phantoms
from vital_jax.data.ingest import IngestError


# ---------------------------------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint16, np.int32, np.float64])
def test_nifti_round_trip(tmp_path, suffix, dtype):
    data = (np.arange(3 * 4 * 5).reshape(3, 4, 5) % 97).astype(dtype)
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    path = str(tmp_path / f"v{suffix}")
    nifti.write_nifti(path, data, affine)
    image = nifti.read_nifti(path)
    assert image.data.dtype == dtype and image.data.shape == (3, 4, 5)
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert image.pixdim[1:4] == pytest.approx((0.7, 0.7, 2.5))


def test_nifti_applies_slope_and_intercept(tmp_path):
    stored = np.array([[[0, 1], [2, 3]]], np.int16)
    nifti.write_nifti(str(tmp_path / "v.nii"), stored, scl_slope=2.0, scl_inter=-1024.0)
    data = nifti.read_nifti(str(tmp_path / "v.nii")).data
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, stored * 2.0 - 1024.0)


def test_nifti_qform_affine_from_quaternion(tmp_path):
    """A 180-degree rotation about z is the quaternion (b, c, d) = (0, 0, 1): x and y flip sign."""
    path = str(tmp_path / "q.nii")
    nifti.write_nifti(path, np.zeros((2, 2, 2), np.uint8), np.diag([2.0, 3.0, 4.0, 1.0]),
                      header_fields=dict(sform_code=0, qform_code=1, quatern_d=1.0, qoffset_x=5.0, pixdim0=-1.0))
    affine = nifti.read_nifti(path).affine
    np.testing.assert_allclose(affine, [[-2, 0, 0, 5], [0, -3, 0, 0], [0, 0, -4, 0], [0, 0, 0, 1]], atol=1e-6)


def test_nifti_reads_big_endian_files(tmp_path):
    path = str(tmp_path / "le.nii")
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nifti.write_nifti(path, data)
    raw = bytearray(open(path, "rb").read())
    big = bytearray(raw)
    # Swap every header field we read, then the data.
    fields = [(0, "i"), *[(40 + 2 * i, "h") for i in range(8)], (70, "h"), (72, "h"),
              *[(76 + 4 * i, "f") for i in range(8)], (108, "f"), (112, "f"), (116, "f"), (252, "h"), (254, "h"),
              *[(256 + 4 * i, "f") for i in range(6)], *[(280 + 4 * i, "f") for i in range(12)]]
    for offset, fmt in fields:
        struct.pack_into(">" + fmt, big, offset, *struct.unpack_from("<" + fmt, raw, offset))
    big[352:] = data.astype(">i2").tobytes(order="F")
    open(tmp_path / "be.nii", "wb").write(bytes(big))
    np.testing.assert_array_equal(nifti.read_nifti(str(tmp_path / "be.nii")).data, data)


def test_nifti_errors_name_the_file(tmp_path):
    path = str(tmp_path / "v.nii.gz")
    nifti.write_nifti(path, np.zeros((4, 4, 4), np.int16))
    raw = gzip.decompress(open(path, "rb").read())
    (tmp_path / "short.nii").write_bytes(raw[:100])
    (tmp_path / "trunc.nii").write_bytes(raw[:-10])
    (tmp_path / "magic.nii").write_bytes(raw[:344] + b"xx1\x00" + raw[348:])
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    code = bytearray(raw)
    code[70:72] = (32).to_bytes(2, "little")  # complex64: unsupported
    (tmp_path / "complex.nii").write_bytes(bytes(code))
    for name, fragment in [("short.nii", "shorter than a NIfTI-1 header"), ("trunc.nii", "data truncated"),
                           ("magic.nii", "not a single-file NIfTI-1"), ("bad.nii.gz", "cannot read"),
                           ("complex.nii", "unsupported NIfTI datatype code 32"), ("absent.nii", "not found")]:
        with pytest.raises(nifti.NiftiError, match=fragment) as e:
            nifti.read_nifti(str(tmp_path / name))
        assert name in str(e.value)


# ------------------------------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("affine, voxel", [
    (np.diag([1.0, 1.0, 1.0, 1.0]), (4, 5)),       # RAS: the most right/anterior voxel has the largest i, j
    (np.diag([-1.0, -1.0, 1.0, 1.0]), (0, 0)),     # LPS-like (DICOM): it has i = j = 0
])
def test_axial_slices_show_anterior_up_and_patient_right_on_image_left(affine, voxel):
    volume = np.zeros((5, 6, 3))
    volume[voxel[0], voxel[1], 2] = 1.0
    slices = ingest.axial_slices(volume, affine, "test")
    assert slices.shape == (3, 6, 5)
    assert slices[2, 0, 0] == 1.0 and slices.sum() == 1.0


def test_axial_slices_find_z_among_permuted_axes():
    """A volume stored (z, x, y) still slices along z."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.0, 1.0, 1.0, 1.0
    volume = np.zeros((3, 5, 6))
    volume[1, 4, 5] = 1.0  # z = 1, most right (x = 4), most anterior (y = 5)
    slices = ingest.axial_slices(volume, affine, "test")
    assert slices.shape == (3, 6, 5) and slices[1, 0, 0] == 1.0


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
        nifti.write_nifti(str(root / f"imagesTr/case_{c}.nii.gz"), ((hu + 1024) // 2).astype(np.int16),
                          np.diag([1.0, 1.0, 1.0, 1.0]), scl_slope=2.0, scl_inter=-1024.0)
        nifti.write_nifti(str(root / f"labelsTr/case_{c}.nii.gz"), label, np.diag([1.0, 1.0, 1.0, 1.0]))
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
    (lambda i, m: Image.fromarray(np.zeros((16, 20), np.uint16)).save(i / "a_CT_liver.png"), "not 8-bit",
     "a_CT_liver.png"),
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
