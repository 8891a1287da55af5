"""Small NIfTI files (nibabel) written by the tests themselves."""

from __future__ import annotations

import nibabel as nib
import numpy as np


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
