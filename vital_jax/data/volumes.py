"""3-D medical volumes in one canonical orientation, and the axial slices and 8-bit windows cut from them.

Canonical orientation is RAS+ (nibabel's): voxel axis i grows toward the patient's Right, j toward Anterior,
k toward Superior. NIfTI-1 and NIfTI-2 files (.nii, .nii.gz) are read with nibabel and DICOM series
(vital_jax.data.dicom) are given a RAS+ affine; both then go through `nibabel.as_closest_canonical`, which only
flips and permutes voxel axes (an oblique volume keeps its obliquity, nothing is resampled). So the same anatomy
gives the same array whatever order the file stored its voxels in.

Axial slices are shown in the radiological convention, as a CT or MR viewer shows them: one image per k (index 0
is the most inferior), image rows run anterior (top) -> posterior, image columns run from the patient's right
(image left) to the patient's left (image right). Questions speak of the image ("the left half of the image",
vital_jax.data.geometry), so "left" there is the image's left, which is the patient's right.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np

CANONICAL_AXES = ("R", "A", "S")
# A mask lies on its image's grid when every voxel centre of one maps within this many voxels of the other's.
GRID_TOLERANCE_VOXELS = 0.1


class VolumeError(ValueError):
    """An unreadable volume or one that does not fit its image; the message names the file(s)."""


@dataclasses.dataclass(frozen=True)
class Volume:
    """`data` (X, Y, Z[, C]) in RAS+ voxel order; `affine` (4, 4) maps voxel indices to RAS+ millimetres."""

    data: np.ndarray
    affine: np.ndarray
    origin: str


def canonical(image: nib.spatialimages.SpatialImage, origin: str) -> nib.spatialimages.SpatialImage:
    """`image` with its voxel axes flipped / permuted to the closest RAS+ order (header read, data untouched)."""
    try:
        out = nib.as_closest_canonical(image)
    except Exception as e:  # nibabel raises several types for degenerate affines
        raise VolumeError(f"{origin}: cannot bring the volume to RAS+ orientation ({e})") from e
    if nib.aff2axcodes(out.affine) != CANONICAL_AXES:
        raise VolumeError(f"{origin}: orientation {''.join(nib.aff2axcodes(out.affine))} after reorientation")
    return out


def load_nifti(path: str, labels: bool = False) -> Volume:
    """A NIfTI-1 or NIfTI-2 file (.nii, .nii.gz) in RAS+ order: float32 values with scl_slope / scl_inter applied,
    which must be finite, or (`labels`) int64 label values, which must be whole numbers."""
    try:
        image = nib.load(path)
    except FileNotFoundError as e:
        raise VolumeError(f"{path}: file not found") from e
    except Exception as e:  # ImageFileError, gzip and header errors
        raise VolumeError(f"{path}: not a readable NIfTI file ({e})") from e
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: {type(image).__name__}, not NIfTI-1 or NIfTI-2")
    if len(image.shape) not in (3, 4):
        raise VolumeError(f"{path}: expected a 3-D volume (or 4-D with channels), got shape {image.shape}")
    image = canonical(image, path)
    try:
        data = np.asarray(image.dataobj) if labels else image.get_fdata(dtype=np.float32)
    except Exception as e:  # truncated or corrupt data: nibabel reads lazily, so it shows up only here
        raise VolumeError(f"{path}: cannot read the voxel data ({e})") from e
    if labels:
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise VolumeError(f"{path}: label volume holds non-integer values")
        data = data.astype(np.int64)
    else:
        # NaN (common outside the brain in preprocessed MR) would pass the windowing as 0, and one NaN makes a
        # percentile-normalised slice all black: slices and questions would be made from blank images.
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise VolumeError(f"{path}: {bad} of {data.size} voxels are NaN or infinite; replace them with a value "
                              f"the modality's background has (e.g. 0 or the minimum) before ingesting")
    return Volume(data=data, affine=np.asarray(image.affine, np.float64), origin=path)


def check_same_grid(image: Volume, mask: Volume, translation: bool = True) -> None:
    """VolumeError naming both files unless `mask` (3-D) covers the same voxels as `image` (its first 3 axes):
    equal shapes and affines that agree to GRID_TOLERANCE_VOXELS (without `translation`, for an image whose
    origin is unknown, only voxel sizes and directions are compared)."""
    if mask.data.ndim != 3:
        raise VolumeError(f"{mask.origin}: mask must be 3-D, got shape {mask.data.shape}")
    if image.data.shape[:3] != mask.data.shape:
        raise VolumeError(f"{mask.origin}: mask shape {mask.data.shape} differs from image {image.origin} shape "
                          f"{image.data.shape[:3]} (both in RAS+ order)")
    # Mask voxel -> image voxel; the identity when both lie on one grid.
    image_affine, mask_affine = image.affine.copy(), mask.affine.copy()
    if not translation:
        image_affine[:3, 3] = mask_affine[:3, 3] = 0.0
    mask_to_image = np.linalg.solve(image_affine, mask_affine)
    corners = np.array([[i, j, k, 1.0] for i in (0, mask.data.shape[0] - 1) for j in (0, mask.data.shape[1] - 1)
                        for k in (0, mask.data.shape[2] - 1)]).T
    offset = float(np.abs(mask_to_image @ corners - corners).max())
    if offset > GRID_TOLERANCE_VOXELS:
        raise VolumeError(f"{mask.origin}: mask grid differs from image {image.origin} (voxels up to {offset:.2f} "
                          f"voxels apart; affines {np.round(mask.affine, 3).tolist()} vs "
                          f"{np.round(image.affine, 3).tolist()})")


def axial_slices(data: np.ndarray) -> np.ndarray:
    """(Z, Y, X) display slices from RAS+ (X, Y, Z) data: rows anterior -> posterior, columns patient right ->
    left (radiological convention, see the module docstring)."""
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, ::-1])


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """uint8 through a (level, width) window (Hounsfield units for CT)."""
    scaled = (values.astype(np.float64) - (level - width / 2.0)) / max(width, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_percentiles(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """uint8 from signal without a calibrated scale (MR): the `low`-`high` percentile range of the nonzero voxels
    of the whole volume -> 0..255."""
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return np.zeros(values.shape, np.uint8)
    lo, hi = np.percentile(nonzero, [low, high])
    scaled = (values.astype(np.float64) - lo) / max(hi - lo, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
