"""2-D image and mask files: the one loader, and the checks every stage applies to them.

The builder, `validate`, training (vital_jax.data.pipeline), `evaluate`, `explain` and the predictor all read
images through `load_image`, so a file one of them accepts the others accept too, and it gives the same pixels
everywhere:

  size      both sides >= MIN_SIDE (8) pixels and long side / short side <= MAX_ASPECT_RATIO (200): the limits of
            the backbone's resize (vital_jax.models.qwen3_vl.preprocessing.smart_resize), enforced when the file
            is read instead of when a training step or an evaluation batch is built from it.
  8 bits    1-bit, gray, palette, RGB, RGBX, CMYK and YCbCr files are converted to RGB by PIL; transparency (an
            alpha band or a palette transparency key) is composited on white, as the HF Qwen-VL processor does.
  >8 bits   16-bit gray ('I;16*') and 32-bit integer gray ('I') files, and integer (H, W) arrays wider than a
            byte, are windowed to 8 bits by the 0.5-99.5 percentiles of their nonzero pixels
            (`volumes.normalize_percentiles`, the rule MR volumes get), per image, then repeated to RGB. A fixed
            [0, 65535] scale would turn 12-bit data, the common case, nearly black.
  refused   float ('F') images and every other mode: their value range is undefined; window them to 8 bits first.

Masks (`load_mask`) are 0/255 (or 0/1) single-channel files of their image's size with at least one foreground
pixel. Every error is an ImageError whose message begins with the file it is about. 3-D volumes (NIfTI, DICOM)
are windowed by vital_jax.data.volumes and do not pass through here.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from vital_jax import image_io

MIN_SIDE = 8
MAX_ASPECT_RATIO = 200
WINDOW_PERCENTILES = (0.5, 99.5)
# Modes PIL converts to RGB without a choice to make.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
# Integer gray modes wider than 8 bits: windowed.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MASK_MODES = ("1", "L", "I", "I;16")


class ImageError(ValueError):
    """An image or mask that no stage can use; the message begins with the file (or names the array)."""


def check_size(height: int, width: int, name: str) -> None:
    """ImageError unless both sides are >= MIN_SIDE and the aspect ratio is <= MAX_ASPECT_RATIO."""
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{name}: image of {width}x{height} pixels is too small (both sides must be at least "
                         f"{MIN_SIDE} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"{name}: image of {width}x{height} pixels has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f} > {MAX_ASPECT_RATIO}")


def check_mode(mode: str, name: str) -> None:
    """ImageError unless `load_image` can turn a PIL image of `mode` into RGB."""
    if mode not in EIGHT_BIT_MODES + WIDE_MODES:
        why = "float images have no defined value range" if mode == "F" else "unsupported mode"
        raise ImageError(f"{name}: image mode {mode!r}: {why}; window it to 8 bits (gray or RGB) first")


def load_image(source) -> np.ndarray:
    """A file path, PIL image or numpy array -> RGB uint8 (H, W, 3), by the rules of the module docstring.

    Arrays: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); any other integer (H, W) array is windowed as a
    wide gray image. Raises ImageError naming the file for a missing, unreadable or truncated file, a refused mode
    and a size outside the limits.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return _to_rgb(image_io.open_file(path, ImageError), path)
    if isinstance(source, Image.Image):
        return _to_rgb(source, getattr(source, "filename", None) or f"<PIL image mode={source.mode} "
                                                                     f"size={source.size}>")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise ImageError(f"unsupported image source of type {type(source).__name__}; pass a file path, a PIL image "
                     "or a numpy array")


def check_file(path: str, decode: bool = False) -> tuple[int, int]:
    """(height, width) of an image file after the checks `load_image` makes from the header (exists, readable,
    mode, size); the pixels are not decoded, so this is cheap enough for every image of a benchmark. `decode`
    then decodes them too (truncated or corrupt data only fails then), without converting them."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such image file")
    try:
        img = Image.open(path)
    except image_io.PIL_READ_ERRORS as e:
        raise ImageError(f"{path}: corrupt or unreadable image ({e})") from e
    with img:
        mode, (width, height) = img.mode, img.size
        check_mode(mode, path)
        check_size(height, width, path)
        if decode:
            try:
                img.load()
            except image_io.PIL_READ_ERRORS as e:
                raise ImageError(f"{path}: corrupt or unreadable image ({e})") from e
    return height, width


def load_mask(path: str, image_shape: tuple[int, int] | None) -> np.ndarray:
    """bool (H, W) from a 0/255 (or 0/1) mask file of the image's (H, W) (any size when `image_shape` is None);
    ImageError for other values, a size mismatch or an empty mask."""
    img = image_io.open_file(path, ImageError, kind="mask")
    try:
        values = np.asarray(img.convert("L") if img.mode not in _MASK_MODES else img)
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: cannot read mode {img.mode!r} as a mask ({e})") from e
    if image_shape is not None and values.shape != tuple(image_shape):
        raise ImageError(f"{path}: mask size {values.shape[::-1]} differs from its image's "
                         f"{tuple(image_shape)[::-1]}")
    levels = set(np.unique(values).tolist())
    if not (levels <= {0, 255} or levels <= {0, 1}):
        raise ImageError(f"{path}: not a binary mask (values {sorted(levels)[:6]}...; expected 0/255)")
    mask = values > 0
    if not mask.any():
        raise ImageError(f"{path}: empty mask (no foreground pixel)")
    return mask


def window_wide(values: np.ndarray) -> np.ndarray:
    """uint8 (H, W) from a gray image wider than 8 bits: its WINDOW_PERCENTILES of the nonzero pixels -> 0..255."""
    from vital_jax.data import volumes  # here: it imports nibabel (seconds), which 8-bit images never need

    return volumes.normalize_percentiles(values, *WINDOW_PERCENTILES)


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    check_mode(img.mode, name)
    check_size(img.height, img.width, name)
    if img.mode in WIDE_MODES:
        return np.repeat(window_wide(np.asarray(img))[:, :, None], 3, axis=2)
    return np.asarray(image_io.to_rgb(img, name, ImageError))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    name = f"<array shape={array.shape} dtype={array.dtype}>"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    check_size(array.shape[0], array.shape[1], name)
    if array.dtype == np.uint8:
        if array.ndim == 2:
            return np.repeat(array[:, :, None], 3, axis=2)
        if array.shape[2] == 3:
            return np.ascontiguousarray(array)
        return _to_rgb(Image.fromarray(array), name)  # (H, W, 4) uint8 is RGBA
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        return np.repeat(window_wide(array)[:, :, None], 3, axis=2)
    raise ImageError(f"{name}: expected uint8 pixels, or an integer (H, W) gray image to window")
