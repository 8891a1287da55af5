"""A small NIfTI-1 reader and writer in numpy (single-file .nii and gzipped .nii.gz), so MSD needs no nibabel.

Reads the 348-byte header (either byte order), the dims, the datatype, `scl_slope`/`scl_inter` and the voxel
to world affine (sform when sform_code > 0, else qform when qform_code > 0, else the pixdim diagonal, as the
NIfTI-1 standard orders them). Data come back in (i, j, k[, t]) voxel order (NIfTI stores them Fortran-ordered).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

HEADER_SIZE = 348
# NIfTI-1 datatype code -> numpy dtype (the scalar types; complex and RGB are not medical-volume types we need).
DATATYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
             512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64}
_CODES = {np.dtype(v): k for k, v in DATATYPES.items()}


class NiftiError(ValueError):
    """A NIfTI file is unreadable or uses a feature this reader does not support; the message names the file."""


@dataclasses.dataclass(frozen=True)
class NiftiImage:
    """`data` (i, j, k[, t]) in the stored dtype, or float32 when scl_slope scaling applies; `affine` (4, 4)."""

    data: np.ndarray
    affine: np.ndarray
    pixdim: tuple[float, ...]


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise NiftiError(f"{path}: file not found")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise NiftiError(f"{path}: cannot read ({e})") from e


def _quaternion_affine(b: float, c: float, d: float, qfac: float, pixdim, offset) -> np.ndarray:
    """NIfTI-1 method 2: rotation from the quaternion (b, c, d), k-axis sign qfac, voxel sizes and offset."""
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    scale = np.array([pixdim[0], pixdim[1], pixdim[2] * (-1.0 if qfac < 0 else 1.0)])
    affine = np.eye(4)
    affine[:3, :3] = rotation * scale[None, :]
    affine[:3, 3] = offset
    return affine


def read_nifti(path: str) -> NiftiImage:
    """Read a single-file NIfTI-1 volume (.nii or .nii.gz). Raises NiftiError naming `path`."""
    raw = _read_bytes(path)
    if len(raw) < HEADER_SIZE:
        raise NiftiError(f"{path}: {len(raw)} bytes, shorter than a NIfTI-1 header ({HEADER_SIZE})")
    for endian in "<>":
        if struct.unpack(endian + "i", raw[:4])[0] == HEADER_SIZE:
            break
    else:
        raise NiftiError(f"{path}: not a NIfTI-1 file (sizeof_hdr is not {HEADER_SIZE} in either byte order)")
    unpack = lambda fmt, offset: struct.unpack_from(endian + fmt, raw, offset)  # noqa: E731
    magic = raw[344:348]
    if magic != b"n+1\x00":
        detail = "a two-file .hdr/.img pair, not supported" if magic == b"ni1\x00" else f"magic {magic!r}"
        raise NiftiError(f"{path}: not a single-file NIfTI-1 volume ({detail})")
    dim = unpack("8h", 40)
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(n < 1 for n in dim[1:ndim + 1]):
        raise NiftiError(f"{path}: invalid dim field {dim}")
    shape = tuple(int(n) for n in dim[1:ndim + 1])
    datatype = unpack("h", 70)[0]
    if datatype not in DATATYPES:
        raise NiftiError(f"{path}: unsupported NIfTI datatype code {datatype}")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder(endian)
    pixdim = unpack("8f", 76)
    vox_offset = int(unpack("f", 108)[0])
    slope, inter = unpack("2f", 112)
    count = int(np.prod(shape))
    end = vox_offset + count * dtype.itemsize
    if vox_offset < HEADER_SIZE or end > len(raw):
        raise NiftiError(f"{path}: data truncated (needs {end} bytes from offset {vox_offset}, file has {len(raw)})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset).reshape(shape, order="F")
    data = data.astype(dtype.newbyteorder("="))
    if np.isfinite(slope) and slope != 0.0 and (slope != 1.0 or inter != 0.0):
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    qform_code, sform_code = unpack("2h", 252)
    if sform_code > 0:
        affine = np.eye(4)
        affine[:3] = np.asarray(unpack("12f", 280), np.float64).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, ox, oy, oz = unpack("6f", 256)
        affine = _quaternion_affine(b, c, d, pixdim[0], pixdim[1:4], (ox, oy, oz))
    else:
        affine = np.diag([pixdim[1] or 1.0, pixdim[2] or 1.0, pixdim[3] or 1.0, 1.0])
    return NiftiImage(data=data, affine=affine, pixdim=tuple(float(p) for p in pixdim))


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray | None = None, scl_slope: float = 0.0,
                scl_inter: float = 0.0, header_fields: dict | None = None) -> None:
    """Write `data` (i, j, k[, t]) as single-file NIfTI-1 (.nii, or gzipped if `path` ends in .gz), little-endian.

    The affine goes into the sform (sform_code 1). `header_fields` overrides raw header fields by name
    (qform_code, sform_code, quatern_b/c/d, qoffset_x/y/z, pixdim0 = qfac) so tests can build qform-only files.
    """
    data = np.asarray(data)
    if data.dtype not in _CODES:
        raise NiftiError(f"{path}: cannot write dtype {data.dtype}")
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    fields = {"qform_code": 0, "sform_code": 1, "quatern_b": 0.0, "quatern_c": 0.0, "quatern_d": 0.0,
              "qoffset_x": 0.0, "qoffset_y": 0.0, "qoffset_z": 0.0, "pixdim0": 1.0, **(header_fields or {})}
    header = bytearray(HEADER_SIZE + 4)  # + the 4-byte extension flag (all zero: no extensions)
    struct.pack_into("<i", header, 0, HEADER_SIZE)
    struct.pack_into("<8h", header, 40, data.ndim, *data.shape, *([1] * (7 - data.ndim)))
    struct.pack_into("<2h", header, 70, _CODES[data.dtype], data.dtype.itemsize * 8)
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    struct.pack_into("<8f", header, 76, fields["pixdim0"], *voxel_sizes, *([1.0] * 4))
    struct.pack_into("<f", header, 108, float(HEADER_SIZE + 4))
    struct.pack_into("<2f", header, 112, scl_slope, scl_inter)
    struct.pack_into("<2h", header, 252, fields["qform_code"], fields["sform_code"])
    struct.pack_into("<6f", header, 256, *(fields[k] for k in ("quatern_b", "quatern_c", "quatern_d",
                                                                "qoffset_x", "qoffset_y", "qoffset_z")))
    struct.pack_into("<12f", header, 280, *affine[:3].reshape(-1))
    header[344:348] = b"n+1\x00"
    payload = bytes(header) + data.astype(data.dtype.newbyteorder("<")).tobytes(order="F")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
