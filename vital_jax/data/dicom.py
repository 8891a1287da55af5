"""A DICOM series -> a RAS+ volume (vital_jax.data.volumes), read with pydicom.

A series is a folder, searched recursively, of single-frame DICOM files with one SeriesInstanceUID (hidden files
and DICOMDIR are skipped; any other file must be DICOM with pixel data). Slices are ordered by
ImagePositionPatient projected on the slice normal (the cross product of the two ImageOrientationPatient
directions) and must be evenly spaced; a series without positions is ordered by InstanceNumber instead and its
origin is unknown. Stored values go through each slice's RescaleSlope / RescaleIntercept (Hounsfield units for
CT). The voxel -> patient affine comes from ImageOrientationPatient, PixelSpacing and the positions; DICOM's
patient axes are LPS, so x and y change sign to give RAS, and the volume then goes through the same
`volumes.canonical` as a NIfTI file: a DICOM series and its NIfTI export give the same slices.
"""

from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import pydicom
from absl import logging
from pydicom.multival import MultiValue

from vital_jax.data import volumes
from vital_jax.data.volumes import VolumeError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """One series in RAS+ order. `volume.data` float32 (X, Y, Z), rescaled values; `window` the series'
    (WindowCenter, WindowWidth), first value of each, or None; `inverted` for MONOCHROME1 (low values shown
    bright); `files` in slice order; `positioned` False when slices were ordered by InstanceNumber."""

    volume: volumes.Volume
    modality: str
    window: tuple[float, float] | None
    inverted: bool
    series_uid: str
    files: tuple[str, ...]
    positioned: bool


def series_files(folder: str) -> list[str]:
    """Every file under `folder` (recursively, sorted), less hidden files and DICOMDIR."""
    if not os.path.isdir(folder):
        raise VolumeError(f"{folder}: DICOM folder not found")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and n.upper() != "DICOMDIR"]
    return found


def _first(value) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _read(path: str) -> tuple[pydicom.Dataset, np.ndarray]:
    """The dataset and its rescaled pixels, float64 (Rows, Columns)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # InvalidDicomError, truncated files, bad element values
        raise VolumeError(f"{path}: not a readable DICOM file ({e})") from e
    if "PixelData" not in ds:
        raise VolumeError(f"{path}: DICOM file without pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise VolumeError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); only single-frame slices")
    if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(f"{path}: photometric interpretation {ds.get('PhotometricInterpretation')!r} is not "
                          "grayscale")
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as e:  # compressed without a decoder, truncated pixel data
        raise VolumeError(f"{path}: cannot decode the pixel data ({e})") from e
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    return ds, pixels * slope + float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _same(datasets, paths, keyword: str, default=None, atol: float = 1e-4):
    """The value of `keyword`, which every slice must share (numbers to `atol`)."""
    values = [ds.get(keyword, default) for ds in datasets]
    first = values[0]
    for value, path in zip(values, paths):
        same = (value == first if value is None or first is None or isinstance(first, str)
                else np.allclose(np.asarray(value, float), np.asarray(first, float), atol=atol))
        if not same:
            raise VolumeError(f"{path}: {keyword} {value} differs from {first} in {paths[0]} (same series)")
    return first


def _order(datasets, paths, normal: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """Slice order and the sorted positions (LPS mm, (N, 3)), or None when the slices have no positions."""
    if not all("ImagePositionPatient" in ds for ds in datasets):
        lacking = [p for ds, p in zip(datasets, paths) if "InstanceNumber" not in ds]
        if lacking:
            raise VolumeError(f"{lacking[0]}: neither ImagePositionPatient nor InstanceNumber to order the slices by")
        return sorted(range(len(datasets)), key=lambda n: int(datasets[n].InstanceNumber)), None
    raw = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = sorted(range(len(datasets)), key=lambda n: float(raw[n] @ normal))
    positions = raw[order]
    along = positions @ normal
    for n in range(1, len(order)):
        if along[n] - along[n - 1] < 1e-3:
            raise VolumeError(f"{paths[order[n]]}: same slice position as {paths[order[n - 1]]} (two acquisitions "
                              "in one series?)")
    if len(order) > 2:
        step = (positions[-1] - positions[0]) / (len(order) - 1)
        off = np.linalg.norm(positions - (positions[0] + np.arange(len(order))[:, None] * step), axis=1)
        if off.max() > 0.1 * np.linalg.norm(step):
            raise VolumeError(f"{paths[order[int(np.argmax(off))]]}: slice positions are not evenly spaced along "
                              f"a line (a missing slice?); {off.max():.2f} mm off")
    return order, positions


def read_series(folder: str) -> DicomSeries:
    """The one DICOM series under `folder` as a RAS+ volume. VolumeError naming the file for a corrupt or
    non-image file, more than one series, slices that disagree in size, spacing or orientation, or gaps."""
    paths = series_files(folder)
    if not paths:
        raise VolumeError(f"{folder}: no DICOM files")
    read = [_read(p) for p in paths]
    datasets = [ds for ds, _ in read]
    uids: dict[str, str] = {}
    for ds, path in zip(datasets, paths):
        uids.setdefault(str(ds.get("SeriesInstanceUID", "")), path)
    if len(uids) > 1:
        raise VolumeError(f"{folder}: {len(uids)} series in one folder (" +
                          ", ".join(f"{uid or 'no SeriesInstanceUID'} e.g. {p}" for uid, p in uids.items()) + ")")
    for key in ("Rows", "Columns"):
        _same(datasets, paths, key)
    modality = str(_same(datasets, paths, "Modality", ""))
    spacing = _same(datasets, paths, "PixelSpacing")
    if spacing is None:
        raise VolumeError(f"{paths[0]}: no PixelSpacing")
    orientation = _same(datasets, paths, "ImageOrientationPatient")
    if orientation is None:
        logging.warning("%s: no ImageOrientationPatient; assuming axial slices", folder)
        orientation = _AXIAL
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    order, positions = _order(datasets, paths, normal)
    if positions is not None and len(order) > 1:
        step = (positions[-1] - positions[0]) / (len(order) - 1)
    else:
        thickness = datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness") or 1.0
        step = normal * float(thickness)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * float(spacing[1])  # column index i moves along a row
    lps[:3, 1] = col_dir * float(spacing[0])  # row index j moves down a column
    lps[:3, 2] = step
    if positions is not None:
        lps[:3, 3] = positions[0]
    data = np.stack([read[n][1] for n in order], axis=-1).transpose(1, 0, 2).astype(np.float32)  # (i, j, k)
    image = volumes.canonical(nib.Nifti1Image(data, _LPS_TO_RAS @ lps), folder)
    first = datasets[order[0]]
    window = None
    if "WindowCenter" in first and "WindowWidth" in first:
        window = (_first(first.WindowCenter), _first(first.WindowWidth))
        if window[1] <= 0:
            logging.warning("%s: WindowWidth %s is not positive; ignored", paths[order[0]], window[1])
            window = None
    return DicomSeries(volume=volumes.Volume(data=np.asarray(image.dataobj), affine=image.affine, origin=folder),
                       modality=modality, window=window, inverted=first.PhotometricInterpretation == "MONOCHROME1",
                       series_uid=next(iter(uids)), files=tuple(paths[n] for n in order),
                       positioned=positions is not None)
