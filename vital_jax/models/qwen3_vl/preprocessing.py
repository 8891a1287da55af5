"""Qwen3-VL image preprocessing in numpy + PIL, matching transformers' `Qwen2VLImageProcessorPil`.

transformers 5.23 maps the `qwen3_vl` model type to {"torchvision": Qwen2VLImageProcessor, "pil":
Qwen2VLImageProcessorPil} and picks torchvision when it is installed, PIL otherwise (or with `backend="pil"`).
This module reproduces the PIL backend exactly (the torchvision one resizes with antialiasing and differs by a
few 1e-3). Pipeline per image:

  RGB uint8 (H, W, 3) -> smart_resize to multiples of patch_size*merge_size (32) with the pixel count clamped to
  [min_pixels, max_pixels] -> PIL bicubic resize on uint8 -> x/255 (computed in float64, stored float32)
  -> (x - mean) / std with mean = std = 0.5 -> repeat along time to temporal_patch_size (2)
  -> patches (grid_h*grid_w, C*T*ps*ps) = (N, 1536) in 2x2 merge-block order, and image_grid_thw = [1, gh, gw].

Defaults are those of the Qwen3-VL checkpoints' `preprocessor_config.json` (patch 16, merge 2, temporal 2,
size = {"shortest_edge": 65536, "longest_edge": 16777216}, mean = std = [0.5]*3), not the Qwen2-VL class defaults
(patch 14, CLIP mean/std) that transformers falls back to without a config; `read_preprocessor_config` reads them
from a checkpoint directory.

Fixed shapes for jitted training: choose `max_pixels = max_pixels_for_patches(P)` so that no image yields more than
P patches, then `pad_patches` pads each image (or batch) to the smallest bucket >= its patch count; see
`pad_patches` for how padded rows must be masked downstream.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from vital_jax import image_io
from vital_jax.jsonio import read_json

# Qwen3-VL preprocessor_config.json values.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 65536  # size["shortest_edge"]: a pixel count, despite the name
MAX_PIXELS = 16777216  # size["longest_edge"]
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Images with a side below this are almost always broken crops; HF would upsample even a 1x1 image to 256x256.
MIN_SIDE = 8
# smart_resize rejects more elongated images (transformers does the same).
MAX_ASPECT_RATIO = 200

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageLoadError(ValueError):
    """An image file or object cannot be turned into RGB uint8; the message names the source."""


class ImagePreprocessError(ValueError):
    """An image cannot be resized/patchified under the requested settings (too small, odd grid, budget)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_image(source, *, alpha: str = "white") -> np.ndarray:
    """Path, PIL image or uint8 array -> RGB uint8 array (H, W, 3).

    Modes: RGB as is; L/P/CMYK/YCbCr/1 through PIL's conversion. Images of more than 8 bits per pixel are
    refused: turning them into 8 bits needs a window, and vital_jax.data.images.load_image applies the one every
    stage of the framework shares (pass its output here). Transparency (an alpha band, or a palette/`transparency`
    key): alpha="white" composites onto a white background, which is what transformers 5.23's `convert_to_rgb`
    (and qwen-vl-utils) do, so results match the HF processor fed the same RGBA image; alpha="drop" discards the
    alpha band as `PIL.Image.convert("RGB")` does. Arrays: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8.
    Raises ImageLoadError naming the file for unreadable / truncated files and unsupported modes or dtypes.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if isinstance(source, (str, os.PathLike)):
        return _image_to_rgb(image_io.open_file(os.fspath(source), ImageLoadError), alpha,
                             name=os.fspath(source))
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", None) or f"<PIL image mode={source.mode} size={source.size}>"
        return _image_to_rgb(source, alpha, name=name)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, alpha)
    raise ImageLoadError(f"unsupported image source of type {type(source).__name__}; "
                         "pass a file path, a PIL.Image.Image or a uint8 numpy array")


def _image_to_rgb(img: Image.Image, alpha: str, name: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise ImageLoadError(f"{name}: empty image of size {img.size}")
    if img.mode in _WIDE_MODES:
        raise ImageLoadError(f"{name}: mode {img.mode!r} has more than 8 bits per pixel; window it to 8 bits first "
                             "(vital_jax.data.images.load_image does, as every vital_jax stage)")
    return np.asarray(image_io.to_rgb(img, name, ImageLoadError, alpha=alpha))


def _array_to_rgb(array: np.ndarray, alpha: str) -> np.ndarray:
    name = f"<array shape={array.shape} dtype={array.dtype}>"
    if array.dtype != np.uint8:
        raise ImageLoadError(f"{name}: expected uint8 (H, W[, C]) pixels; window wider images to 8 bits first "
                             "(vital_jax.data.images.load_image)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return _image_to_rgb(Image.fromarray(array, mode="L"), alpha, name)
    if array.ndim == 3 and array.shape[2] == 3:
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ImageLoadError(f"{name}: empty image")
        return np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] == 4:
        return _image_to_rgb(Image.fromarray(array, mode="RGBA"), alpha, name)
    raise ImageLoadError(f"{name}: expected channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")


# ----------------------------------------------------------------------------------------------------------------
# Resizing and patchifying
# ----------------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, *, factor: int = PATCH_SIZE * MERGE_SIZE, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' `smart_resize` (Python `round` is round-half-even there too), plus errors
    where transformers would return a size that violates its own contract: a side rounding to 0 (possible when
    min_pixels is tiny), or a result above max_pixels (the `max(factor, ...)` clamp on a very elongated image).
    """
    if min(height, width) < min_side:
        raise ImagePreprocessError(f"image of {width}x{height} pixels is too small: both sides must be at least "
                                   f"min_side={min_side}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImagePreprocessError(f"image of {width}x{height} pixels has aspect ratio "
                                   f"{max(height, width) / min(height, width):.1f} > {MAX_ASPECT_RATIO}")
    if min_pixels > max_pixels:
        raise ImagePreprocessError(f"min_pixels={min_pixels} exceeds max_pixels={max_pixels}")
    if max_pixels < factor * factor:
        raise ImagePreprocessError(f"pixel budget max_pixels={max_pixels} is below one merge block "
                                   f"({factor}x{factor}={factor * factor} pixels)")
    target_h = round(height / factor) * factor
    target_w = round(width / factor) * factor
    if target_h * target_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        target_h = max(factor, math.floor(height / scale / factor) * factor)
        target_w = max(factor, math.floor(width / scale / factor) * factor)
    elif target_h * target_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        target_h = math.ceil(height * scale / factor) * factor
        target_w = math.ceil(width * scale / factor) * factor
    if target_h == 0 or target_w == 0:
        raise ImagePreprocessError(f"image of {width}x{height} pixels rounds to {target_w}x{target_h} with "
                                   f"factor={factor} and min_pixels={min_pixels}; raise min_pixels")
    if target_h * target_w > max_pixels:
        raise ImagePreprocessError(f"image of {width}x{height} pixels cannot fit max_pixels={max_pixels}: its "
                                   f"short side is clamped to {factor}, giving {target_w}x{target_h}; raise "
                                   f"max_pixels or crop the image")
    return target_h, target_w


def grid_for_size(height: int, width: int, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                  min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """grid_thw (3,) int64 that `preprocess_image` gives an image of height x width pixels, without its pixels
    (so a prompt's number of image tokens can be known from the file's header)."""
    target_h, target_w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                                      max_pixels=max_pixels, min_side=min_side)
    return np.array([1, target_h // patch_size, target_w // patch_size], dtype=np.int64)

def patchify(image_hwc: np.ndarray, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image (H, W, C) -> (patches (gh*gw, C*T*ps*ps) float32, grid_thw (3,) int64 = [1, gh, gw]).

    Patch rows come in merge-block order: for each (merge_size x merge_size) block of patches in raster order,
    its patches in raster order, so the vision merger can view 4 consecutive rows as one merged token. Each row is
    laid out (C, T, ps_h, ps_w) with the single frame repeated T times: the layout the Conv3d patch embedding
    expects (kernel = stride = [T, ps, ps]).
    """
    height, width, channels = image_hwc.shape
    if height % patch_size or width % patch_size:
        raise ImagePreprocessError(f"image of {width}x{height} pixels is not a multiple of patch_size={patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h % merge_size or grid_w % merge_size:
        raise ImagePreprocessError(f"patch grid of {grid_h} rows x {grid_w} columns is not divisible by "
                                   f"merge_size={merge_size}; "
                                   f"resize to multiples of {patch_size * merge_size} pixels (smart_resize)")
    blocks = image_hwc.astype(np.float32, copy=False).reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, channels)
    # -> (block_row, block_col, row_in_block, col_in_block, C, ps_h, ps_w)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None],
                             (*blocks.shape[:5], temporal_patch_size, patch_size, patch_size))
    patches = np.ascontiguousarray(frames).reshape(grid_h * grid_w,
                                                   channels * temporal_patch_size * patch_size * patch_size)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)


def preprocess_image(image, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE, min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS, image_mean: Sequence[float] = IMAGE_MEAN,
                     image_std: Sequence[float] = IMAGE_STD, min_side: int = MIN_SIDE,
                     alpha: str = "white") -> tuple[np.ndarray, np.ndarray]:
    """One image (path, PIL image or array; see `load_image`) -> (patches (N, 3*T*ps*ps) float32, grid_thw (3,)).

    With the defaults: patches (gh*gw, 1536), grid_thw = [1, gh, gw] int64, gh and gw even; the language model
    sees gh*gw/4 image tokens. Equal to `Qwen2VLImageProcessorPil` output for the same RGB image.
    """
    rgb = load_image(image, alpha=alpha)
    height, width = rgb.shape[:2]
    try:
        target_h, target_w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                                          max_pixels=max_pixels, min_side=min_side)
    except ImagePreprocessError as e:
        if isinstance(image, (str, os.PathLike)):  # say which file
            raise ImagePreprocessError(f"{os.fspath(image)}: {e}") from e
        raise
    if (target_h, target_w) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((target_w, target_h), resample=Image.Resampling.BICUBIC))
    # Rescale in float64 then store float32, as transformers' `rescale` does, so values agree bit for bit.
    pixels = (rgb.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    pixels = (pixels - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    return patchify(pixels, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)


def preprocess_images(images: Sequence, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (patches (sum_i N_i, 1536) float32 concatenated in order, grid_thw (num_images, 3) int64).

    This is the layout of HF's `pixel_values` / `image_grid_thw` for a batch; kwargs go to `preprocess_image`.
    A failing image is named by its index (and its path when it is one).
    """
    if len(images) == 0:
        raise ImagePreprocessError("preprocess_images got no images")
    all_patches, grids = [], []
    for index, image in enumerate(images):
        try:
            patches, grid = preprocess_image(image, **kwargs)
        except (ImageLoadError, ImagePreprocessError) as e:
            raise type(e)(f"image {index}: {e}") from e
        all_patches.append(patches)
        grids.append(grid)
    return np.concatenate(all_patches, axis=0), np.stack(grids)


# ----------------------------------------------------------------------------------------------------------------
# Fixed shapes for jit
# ----------------------------------------------------------------------------------------------------------------


def max_pixels_for_patches(max_patches: int, *, patch_size: int = PATCH_SIZE) -> int:
    """Pixel budget under which `preprocess_image` never yields more than `max_patches` patches per image."""
    if max_patches <= 0:
        raise ImagePreprocessError(f"max_patches must be positive, got {max_patches}")
    return max_patches * patch_size * patch_size


def pad_patches(patches: np.ndarray, grid_thw: np.ndarray, bucket_sizes: Sequence[int], *,
                merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pad patches (N, D) to the smallest bucket Nb >= N -> (padded (Nb, D) float32, valid (Nb,) bool).

    `grid_thw` ((3,) or (num_images, 3)) must account for exactly N patches. Buckets must be multiples of
    merge_size**2 so that padding never shares a merged token with real patches: the merger's (Nb/4, 4*D_vision)
    view then has the N/4 real merged tokens first and `valid[::merge_size**2]` marks them.

    How padded rows must be treated downstream (they are zeros, not data):
      - vision attention: give each patch its image index as segment id (`patch_segment_ids`, -1 for padding)
        and allow attention only where query and key segment ids are equal. That is the block-diagonal
        (cu_seqlens) mask of the real model, and padding rows attend only among themselves, so no row is fully
        masked (which would give NaN softmax) and no real token sees padding.
      - rotary / position embeddings of padded rows: any finite values; their outputs are discarded.
      - merged tokens: scatter only the first N/4 merger outputs (and deepstack features) into the text
        sequence; the prompt holds exactly N/4 image-pad tokens, so padded outputs must never be gathered.
      - no loss or statistic (e.g. a mean over vision tokens) may include padded rows; weight by `valid`.
    """
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    num_patches = int(patches.shape[0])
    expected = int(np.prod(grid_thw, axis=1).sum())
    if num_patches != expected:
        raise ImagePreprocessError(f"patches has {num_patches} rows but grid_thw {grid_thw.tolist()} "
                                   f"accounts for {expected}")
    block = merge_size * merge_size
    buckets = sorted(int(b) for b in bucket_sizes)
    if not buckets:
        raise ImagePreprocessError("bucket_sizes is empty")
    bad = [b for b in buckets if b <= 0 or b % block]
    if bad:
        raise ImagePreprocessError(f"bucket sizes {bad} are not positive multiples of merge_size**2={block}")
    fitting = [b for b in buckets if b >= num_patches]
    if not fitting:
        raise ImagePreprocessError(f"{num_patches} patches exceed the largest bucket {buckets[-1]}; lower "
                                   f"max_pixels (max_pixels_for_patches) or add a larger bucket")
    size = fitting[0]
    padded = np.zeros((size, patches.shape[1]), np.float32)
    padded[:num_patches] = patches
    valid = np.zeros((size,), bool)
    valid[:num_patches] = True
    return padded, valid


def patch_segment_ids(grid_thw: np.ndarray, length: int | None = None) -> np.ndarray:
    """grid_thw (num_images, 3) -> (length,) int32: the image index of each patch row, -1 for padding rows.

    Equal segment ids <=> same image: the block-diagonal vision attention mask is `seg[:, None] == seg[None, :]`.
    """
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    counts = np.prod(grid_thw, axis=1)
    total = int(counts.sum())
    length = total if length is None else int(length)
    if length < total:
        raise ImagePreprocessError(f"length {length} is shorter than the {total} patches of grid_thw")
    segments = np.full((length,), -1, np.int32)
    segments[:total] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    return segments


# ----------------------------------------------------------------------------------------------------------------
# preprocessor_config.json
# ----------------------------------------------------------------------------------------------------------------


def read_preprocessor_config(model_dir: str) -> dict:
    """Image-processor settings of a checkpoint -> kwargs for `preprocess_image` / `preprocess_images`.

    Reads `preprocessor_config.json` (flat, as the Qwen3-VL checkpoints ship it) or, failing that, the
    "image_processor" entry of `processor_config.json` (what transformers 5 `save_pretrained` writes). Every
    setting must be present: transformers would fill a missing one with Qwen2-VL class defaults (patch 14, CLIP
    mean/std), so guessing here could silently disagree with it. Raises ValueError naming the file when it is
    missing, malformed, incomplete, or asks for a step this module does not implement.
    """
    flat = os.path.join(model_dir, "preprocessor_config.json")
    nested = os.path.join(model_dir, "processor_config.json")
    path = flat if os.path.isfile(flat) else nested
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir}: neither preprocessor_config.json nor processor_config.json found")
    cfg = read_json(path, ValueError)
    if path == nested:
        if not isinstance(cfg.get("image_processor"), dict):
            raise ValueError(f"{path}: has no 'image_processor' entry")
        cfg = cfg["image_processor"]
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if cfg.get(flag, True) is not True:
            raise ValueError(f"{path}: {flag}={cfg[flag]!r} is not supported (only the standard pipeline is)")
    if abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"{path}: rescale_factor={cfg['rescale_factor']} is not supported (only 1/255)")
    if cfg.get("resample", 3) != 3:
        raise ValueError(f"{path}: resample={cfg['resample']} is not supported (only 3 = bicubic)")
    size = cfg.get("size") or {}
    min_pixels = cfg.get("min_pixels", size.get("shortest_edge"))
    max_pixels = cfg.get("max_pixels", size.get("longest_edge"))
    missing = [key for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
               if key not in cfg]
    missing += [name for name, value in (("size.shortest_edge", min_pixels), ("size.longest_edge", max_pixels))
                if value is None]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return dict(
        patch_size=int(cfg["patch_size"]),
        merge_size=int(cfg["merge_size"]),
        temporal_patch_size=int(cfg["temporal_patch_size"]),
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        image_mean=tuple(float(v) for v in cfg["image_mean"]),
        image_std=tuple(float(v) for v in cfg["image_std"]),
    )


def write_preprocessor_config(model_dir: str, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                              temporal_patch_size: int = TEMPORAL_PATCH_SIZE, min_pixels: int = MIN_PIXELS,
                              max_pixels: int = MAX_PIXELS, image_mean: Sequence[float] = IMAGE_MEAN,
                              image_std: Sequence[float] = IMAGE_STD) -> str:
    """Write a Qwen3-VL style `preprocessor_config.json` (e.g. for a tiny test model) and return its path."""
    os.makedirs(model_dir, exist_ok=True)
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(image_mean), "image_std": list(image_std),
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
    }
    path = os.path.join(model_dir, "preprocessor_config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path
