"""Decoding an image file with PIL and flattening a PIL image to RGB: the steps every image reader shares.

The backbone's preprocessor (vital_jax.models.qwen3_vl.preprocessing) and the data pipeline's loader
(vital_jax.data.images) accept different modes and sizes, but both open a file and composite its transparency
the same way, so the same file gives the same pixels whichever of them reads it. Each caller passes the error
type it documents; every message begins with the file (or the name the caller gives).
"""

from __future__ import annotations

import os

from PIL import Image

# What PIL raises for a file it cannot identify or decode (truncated data surfaces only in `load`).
PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_file(path: str, error: type[Exception], kind: str = "image") -> Image.Image:
    """The decoded PIL image of `path`; `error` naming the path for a missing, unreadable or truncated file.

    kind: what the file is ("image", "mask"), for the message.
    """
    if not os.path.isfile(path):
        raise error(f"{path}: no such {kind} file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated data only fails here, not in Image.open
            return img.copy()
    except PIL_READ_ERRORS as e:
        raise error(f"{path}: corrupt or unreadable {kind} ({e})") from e


def has_transparency(img: Image.Image) -> bool:
    """An alpha band (straight or premultiplied) or a palette / gray transparency key."""
    bands = img.getbands()
    return "A" in bands or "a" in bands or img.info.get("transparency") is not None


def to_rgb(img: Image.Image, name: str, error: type[Exception], *, alpha: str = "white") -> Image.Image:
    """The RGB copy of a PIL image through PIL's own conversion (`np.asarray` of it: uint8 (H, W, 3)).

    alpha="white" composites transparency on a white background, as the HF Qwen-VL processor (and qwen-vl-utils)
    do; alpha="drop" discards it, as `Image.convert("RGB")` does.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    try:
        if alpha == "white" and has_transparency(img):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise error(f"{name}: cannot convert mode {img.mode!r} to RGB ({e})") from e
