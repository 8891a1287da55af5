"""DICOM series (pydicom files the tests write): slice order, rescale, affine and RAS+ orientation equal to the
NIfTI path, windowing, mask alignment through ingest.iter_dicom, and bad input named by file."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.medical_files import dicom_affine_ras, write_dicom_series, write_nifti
from vital_jax.data import dicom, ingest, volumes
from vital_jax.data.ingest import IngestError

AXIAL, CORONAL, SAGITTAL = (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)
SPACING, STEP, ORIGIN = (0.8, 0.6), 2.0, (-12.0, 30.0, 100.0)


def _hu(shape=(4, 6, 7), seed=0) -> np.ndarray:
    """(slices, rows, columns) Hounsfield units, all different, on a 2-HU grid (slope 2 stores them exactly)."""
    values = np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape)
    return (values * 2 - 200).astype(np.int16)


def _expected_ras(hu: np.ndarray, orientation=AXIAL) -> tuple[np.ndarray, np.ndarray]:
    """What the series must read as: the (column, row, slice) grid with its RAS affine, through nibabel's
    canonical reordering (the NIfTI path)."""
    affine = dicom_affine_ras(ORIGIN, SPACING, STEP, orientation)
    image = nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.float32), affine)
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj), canonical.affine


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL], ids=["axial", "coronal", "sagittal"])
def test_series_reads_in_position_order_with_rescale_and_affine(tmp_path, implicit, orientation):
    hu = _hu()
    shuffled = [3, 0, 2, 1]  # file names and folders unrelated to position; instance numbers run backwards
    write_dicom_series(str(tmp_path / "series"), ((hu + 1024) // 2).astype(np.int16), ORIGIN, SPACING, STEP,
                       orientation, slope=2.0, intercept=-1024.0, implicit=implicit,
                       name=lambda n: f"sub{n % 2}/deeper/f{shuffled[n]}")
    series = dicom.read_series(str(tmp_path / "series"))
    data, affine = _expected_ras(hu, orientation)
    assert series.volume.data.dtype == np.float32 and series.positioned and series.modality == "CT"
    np.testing.assert_array_equal(series.volume.data, data)
    np.testing.assert_allclose(series.volume.affine, affine, atol=1e-5)
    assert nib.aff2axcodes(series.volume.affine) == ("R", "A", "S")
    # The slice written first (n = 0) is nearest ORIGIN, and comes first along the normal.
    assert series.files[0].endswith("sub0/deeper/f3")


def test_unsigned_pixels_and_explicit_nifti_export_agree(tmp_path):
    """A DICOM series and the same voxels saved as NIfTI in DICOM's (column, row, slice) order read identically."""
    hu = _hu()
    write_dicom_series(str(tmp_path / "series"), (hu + 1024).astype(np.uint16), ORIGIN, SPACING, STEP,
                       intercept=-1024.0)
    affine = dicom_affine_ras(ORIGIN, SPACING, STEP)
    nifti_path = write_nifti(str(tmp_path / "export.nii.gz"), hu.transpose(2, 1, 0), affine, version=2)
    series, exported = dicom.read_series(str(tmp_path / "series")), volumes.load_nifti(nifti_path)
    np.testing.assert_array_equal(series.volume.data, exported.data)
    np.testing.assert_allclose(series.volume.affine, exported.affine, atol=1e-5)
    volumes.check_same_grid(series.volume, exported)


def test_slices_without_positions_are_ordered_by_instance_number(tmp_path):
    hu = _hu()
    write_dicom_series(str(tmp_path / "s"), hu, ORIGIN, SPACING, STEP, omit=("ImagePositionPatient",))
    series = dicom.read_series(str(tmp_path / "s"))
    data, _ = _expected_ras(hu[::-1])  # instance numbers run against the (unwritten) positions
    assert not series.positioned
    np.testing.assert_array_equal(series.volume.data, data)


# -------------------------------------------------------------------------------------- ingestion with masks
def _case(root, case="case1", hu=None, window=None, modality="CT", tags=None, label_shape=None, **kwargs):
    """root/images/CASE/ (a series with a bright cube on the patient's left, anterior, superior side) and
    root/labels/CASE.nii.gz, the cube's mask written independently in RAS+ order."""
    if hu is None:
        hu = np.full((6, 20, 24), 50, np.int16)     # (slices, rows, columns): soft tissue
        hu[3:6, 2:9, 14:22] = 400                   # columns -> patient left, rows -> posterior, slices -> up
    write_dicom_series(str(root / "images" / case), hu, ORIGIN, SPACING, STEP, modality=modality, window=window,
                       tags=tags, **kwargs)
    # In RAS+ order the column axis is reversed (x grows to the right) and so is the row axis (y anterior).
    label = np.zeros((24, 20, 6), np.uint8)
    label[24 - 22:24 - 14, 20 - 9:20 - 2, 3:6] = 1
    affine = np.diag([SPACING[1], SPACING[0], STEP, 1.0])
    affine[:3, 3] = [-ORIGIN[0] - 23 * SPACING[1], -ORIGIN[1] - 19 * SPACING[0], ORIGIN[2]]
    if label_shape is not None:
        label = np.zeros(label_shape, np.uint8)
    os.makedirs(root / "labels", exist_ok=True)
    write_nifti(str(root / "labels" / f"{case}.nii.gz"), label, affine)
    return hu


def test_bright_cube_lands_on_its_mask_and_the_series_window_is_used(tmp_path):
    _case(tmp_path, window=([50.0, 300.0], [350.0, 1500.0]))  # multi-valued: the first window applies
    images = list(ingest.iter_dicom(str(tmp_path), {"1": "liver"}, min_mask_pixels=10))
    assert [im.image_id for im in images] == ["case1_z003", "case1_z004", "case1_z005"]
    for im in images:
        assert im.modality == "CT" and im.source == f"DICOM {tmp_path.name}" and im.image.shape == (20, 24, 3)
        (target,) = im.targets
        assert target.name == "liver" and target.normal_anatomy and target.mask.sum() == 7 * 8
        np.testing.assert_array_equal(im.image[..., 0] == 255, target.mask)  # 400 HU saturates a 50/350 window
        rows, cols = np.nonzero(target.mask)
        # Patient's left is the image's right; anterior is up.
        assert cols.min() >= 12 and rows.max() < 10
    assert images[0].image[15, 5, 0] == 128  # 50 HU is the window's centre


@pytest.mark.parametrize("modality, window, override, expected", [
    ("CT", None, None, round((50 + 160) / 400 * 255)),   # CT default: soft tissue 40 / 400
    ("CT", ([300.0], [200.0]), None, 0),                 # the series' window: 50 HU is below it
    ("CT", ([300.0], [200.0]), (50.0, 100.0), 128),      # the config's window wins
    ("MR", None, None, 0),                               # percentiles: the background is the lowest value
])
def test_window_choice(tmp_path, modality, window, override, expected):
    _case(tmp_path, window=window, modality=modality)
    im = next(ingest.iter_dicom(str(tmp_path), {"1": "liver"}, min_mask_pixels=10, window=override))
    assert im.modality == ("CT" if modality == "CT" else "MRI") and im.image[15, 5, 0] == expected
    if modality == "MR":
        assert im.image[..., 0][im.targets[0].mask].min() == 255


def test_monochrome1_is_inverted(tmp_path):
    _case(tmp_path, window=([50.0], [350.0]), tags={"PhotometricInterpretation": "MONOCHROME1"})
    im = next(ingest.iter_dicom(str(tmp_path), {"1": "liver"}, min_mask_pixels=10))
    assert (im.image[..., 0][im.targets[0].mask] == 0).all() and im.image[15, 5, 0] == 127


def test_dicom_and_nifti_sources_give_the_same_slices(tmp_path):
    """The same series through iter_dicom and, exported to NIfTI in DICOM's voxel order, through iter_msd."""
    hu = _case(tmp_path / "dicom")
    task = tmp_path / "msd"
    os.makedirs(task / "imagesTr")
    write_nifti(str(task / "imagesTr/c.nii.gz"), hu.transpose(2, 1, 0), dicom_affine_ras(ORIGIN, SPACING, STEP))
    os.makedirs(task / "labelsTr")
    os.link(tmp_path / "dicom/labels/case1.nii.gz", task / "labelsTr/c.nii.gz")
    (task / "dataset.json").write_text('{"name": "T", "modality": {"0": "CT"}, "labels": {"1": "liver"}, '
                                       '"training": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}]}')
    from_dicom = list(ingest.iter_dicom(str(tmp_path / "dicom"), {"1": "liver"}, min_mask_pixels=10))
    from_nifti = list(ingest.iter_msd(str(task), min_mask_pixels=10))
    assert len(from_dicom) == len(from_nifti) == 3
    for a, b in zip(from_dicom, from_nifti):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.targets[0].mask, b.targets[0].mask)


# ------------------------------------------------------------------------------------------------- errors
def _series_uid(root) -> str:
    return str(pydicom.dcmread(root / "images/case1/IM_0.dcm").SeriesInstanceUID)


def _break_corrupt(root):
    (root / "images/case1/notes.dcm").write_bytes(b"this is not DICOM")
    return "notes.dcm", "not a readable DICOM file"


def _break_truncated(root):
    path = root / "images/case1/IM_2.dcm"
    path.write_bytes(path.read_bytes()[:-100])
    return "IM_2.dcm", "cannot decode the pixel data"


def _break_missing_mask(root):
    os.remove(root / "labels/case1.nii.gz")
    return "images/case1", "missing mask"


def _break_orphan_mask(root):
    write_nifti(str(root / "labels/case9.nii.gz"), np.zeros((2, 2, 2), np.uint8))
    return "case9.nii.gz", "no DICOM folder"


def _break_mixed_series(root):
    write_dicom_series(str(root / "images/case1/other"), np.zeros((1, 20, 24), np.int16), ORIGIN, SPACING, STEP)
    return "case1", "2 series in one folder"


def _break_duplicate_position(root):
    write_dicom_series(str(root / "images/case1"), np.zeros((1, 20, 24), np.int16), ORIGIN, SPACING, STEP,
                       series_uid=_series_uid(root),
                       name=lambda n: "again.dcm")
    return "again.dcm", "same slice position"


def _break_gap(root):
    os.remove(root / "images/case1/IM_3.dcm")
    return "case1", "not evenly spaced"


def _break_rows(root):
    write_dicom_series(str(root / "images/case1"), np.zeros((1, 20, 25), np.int16), ORIGIN, SPACING, STEP,
                       series_uid=_series_uid(root),
                       name=lambda n: "IM_0.dcm")
    return "IM_0.dcm", "Columns 24 differs from 25"


def _break_color(root):
    write_dicom_series(str(root / "images/case1"), np.zeros((1, 20, 24), np.int16), ORIGIN, SPACING, STEP,
                       tags={"PhotometricInterpretation": "RGB"}, name=lambda n: "IM_0.dcm")
    return "IM_0.dcm", "not grayscale"


@pytest.mark.parametrize("break_it", [_break_corrupt, _break_truncated, _break_missing_mask, _break_orphan_mask,
                                      _break_mixed_series, _break_duplicate_position, _break_gap, _break_rows,
                                      _break_color])
def test_bad_dicom_input_names_the_file(tmp_path, break_it):
    _case(tmp_path)
    culprit, fragment = break_it(tmp_path)
    with pytest.raises(IngestError, match=fragment) as e:
        list(ingest.iter_dicom(str(tmp_path), {"1": "liver"}))
    assert culprit in str(e.value)


def test_mask_of_another_shape_names_both_files(tmp_path):
    _case(tmp_path, label_shape=(24, 20, 5))
    with pytest.raises(IngestError, match=r"mask shape \(24, 20, 5\) differs") as e:
        list(ingest.iter_dicom(str(tmp_path), {"1": "liver"}))
    assert "labels/case1.nii.gz" in str(e.value) and "images/case1" in str(e.value)


def test_label_names_are_required(tmp_path):
    _case(tmp_path)
    with pytest.raises(IngestError, match="no label names"):
        list(ingest.iter_dicom(str(tmp_path), {}))
