"""Small NIfTI (nibabel) and DICOM (pydicom) files written by the tests themselves."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray | None = None, version: int = 1,
                slope: float | None = None, inter: float = 0.0) -> str:
    """`data` (i, j, k) as NIfTI-`version` (1 or 2); stored as given, with scl_slope / scl_inter if `slope`."""
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = cls(np.asarray(data), np.eye(4) if affine is None else np.asarray(affine, np.float64))
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    image.to_filename(path)
    return path


def flip_axis(data: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy with voxel axis `axis` stored in reverse: every voxel keeps its world position."""
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, data.shape[axis] - 1
    return np.flip(data, axis), affine @ flip


def permute_axes(data: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy with voxel axes stored in `order` (new axis n is old axis order[n])."""
    perm = np.zeros((4, 4))
    perm[3, 3] = 1.0
    for new, old in enumerate(order):
        perm[old, new] = 1.0
    return np.transpose(data, order), affine @ perm


def dicom_affine_ras(origin, spacing=(1.0, 1.0), step=1.0, orientation=(1, 0, 0, 0, 1, 0)) -> np.ndarray:
    """RAS affine of the (column, row, slice) voxel grid that `write_dicom_series` describes."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * spacing[1], col_dir * spacing[0]
    lps[:3, 2] = np.cross(row_dir, col_dir) * step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def write_dicom_series(folder: str, stored: np.ndarray, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0), step=1.0,
                       orientation=(1, 0, 0, 0, 1, 0), modality: str = "CT", slope: float = 1.0,
                       intercept: float = 0.0, window=None, series_uid: str | None = None, implicit: bool = False,
                       tags: dict | None = None, omit: tuple[str, ...] = (), name=None) -> list[str]:
    """One single-frame file per slice of `stored` (slices, rows, columns), int16 or uint16, slice n at
    `origin + n * step * normal` (LPS mm). `window` (centres, widths) may hold lists (multi-valued tags); `tags`
    are set on every slice; `omit` keywords are deleted; `name(n)` gives slice n's path under `folder` (default
    IM_n.dcm). Instance numbers run opposite to positions, so that ordering by them would be wrong."""
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    paths = []
    for n, pixels in enumerate(stored):
        path = os.path.join(folder, name(n) if name else f"IM_{n}.dcm")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
        ds.InstanceNumber = len(stored) - n
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + n * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in spacing]
        ds.SliceThickness = float(step)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = int(pixels.dtype == np.int16)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        for key in omit:
            delattr(ds, key)
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
