"""Adaptive ROI features f_ROI: the visual supervision targets of L_visual (paper §3.4 and Appendix A.5).

For each (image, segmentation mask) pair a frozen MedSigLIP encoder gives a grid of patch features (32 x 32 x 1152
at 448 px), and the ROI feature is a mean of some of them, chosen by the mask's area ratio r = mean(mask):

  r >= T (full-image pathway): encode the whole image (plain resize to the encoder size); area-downsample the mask
      to the patch grid (each cell = fraction of the cell the mask covers) and binarise at 0.3; pool the patches
      whose cell passes ("mask-aligned patches").
  r <  T (tight-crop pathway): take the mask's bounding box, widen it by P x (box height) above and below and
      P x (box width) left and right (clipped to the image), place the crop centred on a zero (black) square canvas,
      resize that to the encoder size and encode it; pool the *valid* patches, those whose cell is at least
      `valid_fraction` (0.5) real image content rather than zero padding. The whole crop, margin included, is the
      ROI here: that is what the tight crop is for.

Then f_ROI = pooled / ||pooled||_2, and the top-5 pooled patches by cosine similarity to f_ROI are stored as grid
ids (row * grid + col in the encoded view: the full image or the square crop canvas) with their cosine scores, for
visualisation. Fewer than 5 pooled patches (only possible with tiny grids) leave id -1 / score 0 in the spare slots.

Patch features are the output of the *last encoder block*, before SigLIP's post-layernorm, as A.5.2 says ("hooking
the output of the last vision encoder block"); its Figure 9 intensities (~2,750 mean patch norm) are residual-stream
magnitudes, which a LayerNorm output of dim 1152 (norm ~34 times its scale) cannot reach. `feature_layer=
"post_layernorm"` selects HF's `last_hidden_state` instead.

Defaults T = 0.20, P = 0.05, binarisation 0.3 are the paper's (A.5.3). Choices the paper leaves open and made here:
margins relative to the box size, a centred canvas, the 0.5 validity cut, masks read as `value >= 128`.

Dataset level: `extract_dataset_rois` fills a record directory's `roi_features.npy` (N, dv) float32,
`roi_top_patch_ids.npy` (N, 5) int32 and `roi_top_patch_scores.npy` (N, 5) float32 (one row per distinct
(image, mask) pair) and rewrites `records.jsonl` with each record's `roi_index`; the files are replaced as one unit
(a crash between two renames leaves a journal that the loaders refuse until the command is rerun).
With `global_features=True` (or when the directory already has one) it also writes `global_features.npy`, the
same rows' f_global (Appendix C.5: the l2-normalised mean of all patch features of the whole image, plain resize,
no mask), which the per-step visual targets (`vital.visual_target="interpolated"`) interpolate from.

CLI: python -m vital_jax.data.roi --data_dir=DIR --encoder_dir=HF_SIGLIP_DIR [--threshold=0.2 --padding=0.05]
     [--global_features]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from vital_jax.data import images as images_lib  # (`images` names the image lists below)
from vital_jax.data.images import ImageError, load_image
from vital_jax.data.records import (GLOBAL_FEATURES_FILE, RECORDS_FILE, ROI_FEATURES_FILE, ROI_PROVENANCE_FILE,
                                    ROI_TOP_PATCH_IDS_FILE, ROI_TOP_PATCH_SCORES_FILE, ROI_WRITE_JOURNAL, Record,
                                    pending_roi_write, read_records, roi_provenance)
from vital_jax.jsonio import atomic_write, fsync_directory
from vital_jax.models.hf_config import ConfigError, read_config_json
from vital_jax.models.siglip import SiglipPreprocessor, SiglipVisionConfig, SiglipVisionModel, load_siglip_vision
from vital_jax.models.siglip.preprocessing import PREPROCESSOR_FILE

FULL, CROP = "full", "crop"
FEATURE_LAYERS = ("last_block", "post_layernorm")


class RoiError(ValueError):
    """An ROI feature cannot be computed for a record (empty mask, size mismatch, non-finite feature...)."""


@dataclasses.dataclass(frozen=True)
class RoiConfig:
    """Hyper-parameters of the adaptive extraction (A.5.2); defaults are the paper's selected T=0.20, P=0.05."""

    threshold: float = 0.20  # T: mask area ratio at or above which the full image is encoded
    padding: float = 0.05  # P: crop margin per side, as a fraction of the box's height / width
    mask_binarize: float = 0.3  # a grid cell is ROI when at least this fraction of it is mask
    valid_fraction: float = 0.5  # a crop-canvas cell is valid when at least this fraction of it is image content
    top_k: int = 5
    batch_size: int = 8

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.padding <= 1.0:
            raise ValueError(f"padding must be in [0, 1], got {self.padding}")
        for name in ("mask_binarize", "valid_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError(f"top_k and batch_size must be positive, got {self.top_k}, {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class RoiEncoder:
    """A frozen patch encoder as the ROI code sees it.

    patch_features(params, pixels (B, S, S, 3) float32) -> (B, grid_size**2, dv) patch features in raster order.
    preprocessor turns a PIL image into (S, S, 3) pixels (S = preprocessor.height = width).
    Instances are hashable (the jitted pooling is compiled once per encoder).
    """

    patch_features: Callable[[Any, jax.Array], jax.Array]
    preprocessor: SiglipPreprocessor
    grid_size: int

    @property
    def image_size(self) -> int:
        return self.preprocessor.height

    def image_patches(self, params, image_rgb: np.ndarray) -> jax.Array:
        """(1, grid_size**2, dv) patch features of a whole (H, W, 3) uint8 image (the latent-step heatmaps')."""
        return self.patch_features(params, jnp.asarray(self.preprocessor(Image.fromarray(image_rgb))[None]))


@dataclasses.dataclass(frozen=True)
class RoiView:
    """What the encoder sees for one pair, with its patch selections (host-side numpy).

    pixels (S, S, 3) float32; pool (G*G,) bool: patches averaged into f_ROI; roi (G*G,) bool: patches whose cell
    is >= mask_binarize mask; valid (G*G,) bool: patches that are image content (all of them for 'full');
    box (top, left, bottom, right) exclusive-end pixel box of the encoded region in the original image.
    """

    pixels: np.ndarray
    pool: np.ndarray
    roi: np.ndarray
    valid: np.ndarray
    pathway: str
    box: tuple[int, int, int, int]
    mask_ratio: float


@dataclasses.dataclass(frozen=True)
class RoiFeatures:
    """Per pair: features (N, dv) float32 unit norm, top_ids (N, k) int32 grid ids (-1 = unused slot),
    top_scores (N, k) float32 cosine similarities, pathway (N,) str 'full' | 'crop', boxes (N, 4) int32 encoded
    region (top, left, bottom, right), patch_norms (N, G*G) float32 L2 norm of every patch feature, and the
    views' roi / valid patch masks (N, G*G) bool (the last three feed the grid-search metrics)."""

    features: np.ndarray
    top_ids: np.ndarray
    top_scores: np.ndarray
    pathway: np.ndarray
    boxes: np.ndarray
    patch_norms: np.ndarray
    roi_patches: np.ndarray
    valid_patches: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Geometry (numpy, host side)
# ---------------------------------------------------------------------------------------------------------------


def covered_cells(coverage: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Which cells of a grid a mask is in, from its coverage (the fraction of each cell's area inside it): those
    covered at least `threshold`; a non-empty mask that covers no cell that much (a lesion of a few pixels) is in
    the cell(s) it covers most, so it is never in no cell. An empty mask is in none."""
    cells = coverage >= threshold - 1e-6  # exact halves stay halves despite float round-off
    if not cells.any() and coverage.max() > 0:
        cells = coverage >= coverage.max() * (1 - 1e-6)  # relative: a one-pixel mask of a large image is tiny
    return cells


def mask_cells(mask: np.ndarray, coverage_of: Callable[[np.ndarray], np.ndarray],
               threshold: float = 0.5) -> tuple[np.ndarray, int]:
    """(cells, pieces in their best cell): the cells of a grid a mask (H, W) bool is in, `covered_cells` of the
    whole mask's coverage and of each 8-connected piece's own, together, so a second, smaller lesion beside a
    large one is in its best-covered cell too (by the whole mask's coverage it was in no cell). `coverage_of` maps
    a mask to its grid coverage (the caller's geometry); the count says how many pieces covered no cell to
    `threshold` and were placed in their best-covered cell(s)."""
    from scipy import ndimage

    cells = covered_cells(coverage_of(mask), threshold)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    small = 0
    for index in range(1, count + 1):
        coverage = coverage_of(labels == index) if count > 1 else coverage_of(mask)
        small += not (coverage >= threshold - 1e-6).any()
        cells |= covered_cells(coverage, threshold)
    return cells, small


def area_downsample(values: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) -> (grid, grid) float32: the mean of each cell, cells bounded as torch's `interpolate(mode="area")`
    (adaptive average pooling: rows floor(i*H/g) .. ceil((i+1)*H/g)), so cells overlap when H % grid != 0."""
    values = np.asarray(values, np.float64)
    height, width = values.shape
    if height < 1 or width < 1:
        raise ValueError(f"cannot downsample an empty array of shape {values.shape}")
    # Summed-area table: each cell mean in O(1).
    table = np.zeros((height + 1, width + 1))
    table[1:, 1:] = values.cumsum(0).cumsum(1)
    cells = np.arange(grid)
    r0, r1 = (cells * height) // grid, -((-(cells + 1) * height) // grid)
    c0, c1 = (cells * width) // grid, -((-(cells + 1) * width) // grid)
    sums = (table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0])
    return (sums / np.outer(r1 - r0, c1 - c0)).astype(np.float32)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right), ends exclusive, of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def expand_box(box: tuple[int, int, int, int], padding: float, height: int, width: int
               ) -> tuple[int, int, int, int]:
    """Widen a box by round(padding * box side) on each side, clipped to the image."""
    top, left, bottom, right = box
    margin_y, margin_x = round(padding * (bottom - top)), round(padding * (right - left))
    return (max(0, top - margin_y), max(0, left - margin_x), min(height, bottom + margin_y),
            min(width, right + margin_x))


def crop_canvas(values: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The tight-crop pathway's view of an array (H, W, ...): its `box` placed centred on a zero square canvas
    whose side is the box's longer side. -> (canvas (side, side, ...) of values' dtype, content (side, side)
    float32: 1 where the canvas holds the crop, 0 on the padding)."""
    top, left, bottom, right = box
    crop_h, crop_w = bottom - top, right - left
    side = max(crop_h, crop_w)
    off_y, off_x = (side - crop_h) // 2, (side - crop_w) // 2
    canvas = np.zeros((side, side) + values.shape[2:], values.dtype)
    canvas[off_y:off_y + crop_h, off_x:off_x + crop_w] = values[top:bottom, left:right]
    content = np.zeros((side, side), np.float32)
    content[off_y:off_y + crop_h, off_x:off_x + crop_w] = 1.0
    return canvas, content


def prepare_view(image_rgb: np.ndarray, mask: np.ndarray, encoder: RoiEncoder, cfg: RoiConfig,
                 name: str = "example") -> RoiView:
    """Choose the pathway for one (image (H, W, 3) uint8, mask (H, W) bool) pair and build what gets encoded.

    Raises RoiError naming `name` for an empty mask or a mask whose size differs from the image's.
    """
    height, width = image_rgb.shape[:2]
    if mask.shape != (height, width):
        raise RoiError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {width}x{height}")
    mask_ratio = float(mask.mean())
    if mask_ratio == 0.0:
        raise RoiError(f"{name}: the mask is empty, so there is no ROI to pool")
    grid = encoder.grid_size
    if mask_ratio >= cfg.threshold:
        roi = (area_downsample(mask, grid) >= cfg.mask_binarize).reshape(-1)
        if not roi.any():
            raise RoiError(f"{name}: the mask covers {mask_ratio:.1%} of the image but no {grid}x{grid} grid cell "
                           f"is >= {cfg.mask_binarize} mask (a thin or scattered mask); nothing to pool")
        pixels = encoder.preprocessor(Image.fromarray(image_rgb))
        return RoiView(pixels=pixels, pool=roi, roi=roi, valid=np.ones_like(roi), pathway=FULL,
                       box=(0, 0, height, width), mask_ratio=mask_ratio)

    box = expand_box(mask_box(mask), cfg.padding, height, width)
    crop_h, crop_w = box[2] - box[0], box[3] - box[1]
    canvas, content = crop_canvas(image_rgb, box)
    mask_canvas, _ = crop_canvas(mask.astype(np.float32), box)
    valid = (area_downsample(content, grid) >= cfg.valid_fraction).reshape(-1)
    if not valid.any():
        raise RoiError(f"{name}: the {crop_h}x{crop_w} px crop is so elongated that no {grid}x{grid} cell of its "
                       f"square canvas is >= {cfg.valid_fraction} image content; lower valid_fraction or padding")
    roi = (area_downsample(mask_canvas, grid) >= cfg.mask_binarize).reshape(-1) & valid
    pixels = encoder.preprocessor(Image.fromarray(canvas))
    return RoiView(pixels=pixels, pool=valid, roi=roi, valid=valid, pathway=CROP, box=box, mask_ratio=mask_ratio)


# ---------------------------------------------------------------------------------------------------------------
# Device side: encode, pool, normalise, rank
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("encoder", "top_k"))
def _encode_and_pool(encoder: RoiEncoder, top_k: int, params, pixels_bssc: jax.Array, pool_bn: jax.Array):
    """pixels (B, S, S, 3), pool (B, N) bool -> features (B, D), top ids (B, k), top scores (B, k), norms (B, N)."""
    patches_bnd = encoder.patch_features(params, pixels_bssc).astype(jnp.float32)
    weights_bn = pool_bn.astype(jnp.float32)
    count_b = jnp.maximum(weights_bn.sum(1, keepdims=True), 1.0)  # padding rows of a last batch pool nothing
    pooled_bd = jnp.einsum("bn,bnd->bd", weights_bn, patches_bnd, precision="highest") / count_b
    features_bd = pooled_bd / jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
    norms_bn = jnp.linalg.norm(patches_bnd, axis=-1)
    cosine_bn = jnp.einsum("bnd,bd->bn", patches_bnd, features_bd, precision="highest") / jnp.maximum(norms_bn,
                                                                                                       1e-30)
    scores, ids = jax.lax.top_k(jnp.where(pool_bn, cosine_bn, -jnp.inf), top_k)
    unused = jnp.isneginf(scores)
    return features_bd, jnp.where(unused, -1, ids).astype(jnp.int32), jnp.where(unused, 0.0, scores), norms_bn


def extract_roi_features(images: Sequence, masks: Sequence, encoder: RoiEncoder, params, cfg: RoiConfig = RoiConfig(),
                         names: Sequence[str] | None = None) -> RoiFeatures:
    """Adaptive ROI features (A.5.2) for N (image, mask) pairs, batched and jitted with fixed batch shapes.

    images: paths, PIL images or uint8 arrays (anything `vital_jax.data.images.load_image` takes; RGBA is
      composited on white). masks: paths, PIL images or (H, W) arrays, same size as their image; nonzero (or
      >= 128 for 8-bit images) is ROI. names: per pair, used in error messages (default "example i").
    Returns RoiFeatures (see there); features are L2-normalised float32 (N, dv).
    Raises RoiError naming the pair for an unreadable file, an empty mask or a non-finite feature.
    """
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images but {len(masks)} masks")
    names = [f"example {i}" for i in range(len(images))] if names is None else list(names)
    if len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if not images:
        raise ValueError("extract_roi_features got no images")
    num_patches, bsz = encoder.grid_size ** 2, cfg.batch_size
    out = dict(features=[], top_ids=[], top_scores=[], patch_norms=[])
    # Only the small per-view facts are kept: the pixels of 61K views would not fit in memory.
    pathways, boxes, roi_patches, valid_patches = [], [], [], []
    pending = None
    for start in range(0, len(images), bsz):
        chunk = range(start, min(start + bsz, len(images)))
        batch_views = [_view_for(images[i], masks[i], encoder, cfg, names[i]) for i in chunk]
        # Fixed shapes: the last batch is padded with zero images that pool nothing, so one compilation serves all.
        pixels = np.zeros((bsz, encoder.image_size, encoder.image_size, 3), np.float32)
        pool = np.zeros((bsz, num_patches), bool)
        for row, view in enumerate(batch_views):
            pixels[row], pool[row] = view.pixels, view.pool
        # Dispatch is asynchronous: the host prepares the next batch while the device encodes this one.
        result = _encode_and_pool(encoder, cfg.top_k, params, pixels, pool)
        if pending is not None:
            _collect(out, *pending)
        pending = (result, len(batch_views))
        for view in batch_views:
            pathways.append(view.pathway)
            boxes.append(view.box)
            roi_patches.append(view.roi)
            valid_patches.append(view.valid)
    _collect(out, *pending)
    features = np.concatenate(out["features"])
    bad = np.flatnonzero(~np.isfinite(features).all(1))
    if bad.size:
        raise RoiError(f"{names[bad[0]]}: the ROI feature is not finite ({bad.size} of {len(features)} pairs "
                       f"affected: {[names[i] for i in bad[:5]]}); check the encoder weights and the image")
    return RoiFeatures(
        features=features, top_ids=np.concatenate(out["top_ids"]), top_scores=np.concatenate(out["top_scores"]),
        pathway=np.array(pathways), boxes=np.array(boxes, np.int32), patch_norms=np.concatenate(out["patch_norms"]),
        roi_patches=np.stack(roi_patches), valid_patches=np.stack(valid_patches))


def extract_global_features(images: Sequence, encoder: RoiEncoder, params, batch_size: int = 8,
                            names: Sequence[str] | None = None) -> np.ndarray:
    """f_global (Appendix C.5) of N images: the whole image plain-resized to the encoder size (as the full-image
    pathway encodes it), every patch feature averaged, l2-normalised. Returns (N, dv) float32.
    Raises RoiError naming the image for an unreadable file or a non-finite feature."""
    names = [f"image {i}" for i in range(len(images))] if names is None else list(names)
    if len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if not images:
        raise ValueError("extract_global_features got no images")
    size, num_patches = encoder.image_size, encoder.grid_size ** 2
    features = []
    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        pixels = np.zeros((batch_size, size, size, 3), np.float32)
        pool = np.zeros((batch_size, num_patches), bool)
        for row, i in enumerate(chunk):
            try:
                pixels[row] = encoder.preprocessor(Image.fromarray(load_image(images[i])))
            except ImageError as e:
                raise RoiError(f"{names[i]}: {e}") from e
            pool[row] = True
        pooled = _encode_and_pool(encoder, 1, params, pixels, pool)[0]
        features.append(np.asarray(pooled)[:len(chunk)])
    features = np.concatenate(features)
    bad = np.flatnonzero(~np.isfinite(features).all(1))
    if bad.size:
        raise RoiError(f"{names[bad[0]]}: the global feature is not finite ({bad.size} of {len(features)} images)")
    return features


def _collect(out: dict, result, count: int) -> None:
    for key, value in zip(("features", "top_ids", "top_scores", "patch_norms"), result):
        out[key].append(np.asarray(value)[:count])


def _view_for(image, mask, encoder: RoiEncoder, cfg: RoiConfig, name: str) -> RoiView:
    try:
        rgb = load_image(image)
    except ImageError as e:
        raise RoiError(f"{name}: {e}") from e
    return prepare_view(rgb, load_mask(mask, name), encoder, cfg, name)


def load_mask(source, name: str = "mask") -> np.ndarray:
    """Path, PIL image or array -> (H, W) bool. A file is read as the dataset's validation reads it
    (`images.load_mask`: 0/255 or 0/1 values only, at least one foreground pixel), so this command accepts no mask
    `validate` refuses (it thresholded grey, anti-aliased masks at 128). In memory: 8-bit masks are ROI where
    >= 128; bool and other integer arrays where nonzero. Raises RoiError naming `name` (and the file)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise RoiError(f"{name}: mask file {path} not found")
        try:
            return images_lib.load_mask(path, None)
        except ImageError as e:  # its message starts with the path
            raise RoiError(str(e) if name == path else f"{name}: {e}") from e
    if isinstance(source, Image.Image):
        if source.mode not in ("1", "L", "I", "I;16", "P"):
            source = source.convert("L")
        source = np.asarray(source)
    array = np.asarray(source)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise RoiError(f"{name}: a mask must be (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        if 0 < array.max() < 128:
            raise RoiError(f"{name}: 8-bit mask values only reach {array.max()}; expected 0/255 masks "
                           "(scale 0/1 masks by 255)")
        return array >= 128
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array != 0
    raise RoiError(f"{name}: mask dtype {array.dtype} is not bool or integer")


def patch_similarity_map(feature: np.ndarray, patch_features: np.ndarray) -> np.ndarray:
    """Cosine similarity of every patch to a feature, as a map: feature (dv,), patch_features (Np, dv) with Np a
    square number (raster order) -> (grid, grid) float32 in [-1, 1]. Zero-norm patches get 0.

    A.5.1's patch-level activation map (Figure 8) of an ROI feature; no command draws it (the visual window of
    `explain` compares VP(z_k) with the patches through `vital.interpret`).
    """
    feature = np.asarray(feature, np.float32)
    patch_features = np.asarray(patch_features, np.float32)
    if feature.ndim != 1 or patch_features.ndim != 2 or patch_features.shape[1] != feature.shape[0]:
        raise ValueError(f"expected feature (dv,) and patch_features (Np, dv), got {feature.shape} and "
                         f"{patch_features.shape}")
    grid = math.isqrt(patch_features.shape[0])
    if grid * grid != patch_features.shape[0]:
        raise ValueError(f"{patch_features.shape[0]} patches do not form a square grid")
    feature_norm = np.linalg.norm(feature)
    if not np.isfinite(feature_norm) or feature_norm == 0:
        raise ValueError(f"feature has norm {feature_norm}; cosine similarity is undefined")
    norms = np.linalg.norm(patch_features, axis=1)
    cosine = patch_features @ (feature / feature_norm) / np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, cosine, 0.0).reshape(grid, grid).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Encoder loading
# ---------------------------------------------------------------------------------------------------------------


def siglip_roi_encoder(model: SiglipVisionModel, preprocessor: SiglipPreprocessor,
                       feature_layer: str = "last_block") -> RoiEncoder:
    """A RoiEncoder over our Flax SigLIP. feature_layer: 'last_block' (output of the last encoder layer, A.5.2)
    or 'post_layernorm' (HF's last_hidden_state)."""
    if feature_layer not in FEATURE_LAYERS:
        raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS}, got {feature_layer!r}")
    config = model.config
    if (preprocessor.height, preprocessor.width) != (config.image_size, config.image_size):
        raise ConfigError(f"preprocessor size {preprocessor.height}x{preprocessor.width} does not match the "
                          f"encoder's image_size {config.image_size}")
    return RoiEncoder(patch_features=_SiglipPatchFeatures(model, feature_layer), preprocessor=preprocessor,
                      grid_size=config.grid_size)


@dataclasses.dataclass(frozen=True)
class _SiglipPatchFeatures:
    model: SiglipVisionModel
    feature_layer: str

    def __call__(self, params, pixels_bssc: jax.Array) -> jax.Array:
        if self.feature_layer == "post_layernorm":
            return self.model.apply({"params": params}, pixels_bssc).last_hidden_state
        _, state = self.model.apply({"params": params}, pixels_bssc,
                                    capture_intermediates=lambda module, _: module.name == "encoder")
        return state["intermediates"]["encoder"]["__call__"][0]


def load_roi_encoder(encoder_dir: str, feature_layer: str = "last_block", dtype=jnp.float32
                     ) -> tuple[RoiEncoder, dict]:
    """A SigLIP / MedSigLIP directory (config.json, HF safetensors or params converted by hf_to_flax,
    preprocessor_config.json) -> (encoder, params).

    The MAP head is not loaded (ROI features use patch tokens only).
    """
    if not os.path.isfile(os.path.join(encoder_dir, PREPROCESSOR_FILE)):
        raise ConfigError(f"{os.path.join(encoder_dir, PREPROCESSOR_FILE)}: not found; the ROI encoder needs its "
                          "image processor settings (size, mean, std)")
    config, params = load_siglip_vision(encoder_dir, dtype=dtype, use_head=False)
    preprocessor = SiglipPreprocessor.from_pretrained(encoder_dir)
    params = jax.tree.map(jnp.asarray, params)
    return siglip_roi_encoder(SiglipVisionModel(config), preprocessor, feature_layer), params


# What makes two ROI encoders give patch features in different spaces, read from their config.json: the model type
# of the vision tower (a full SigLIP's vision_config and a SiglipVisionModel with the same weights are the same
# encoder), its width, patch and input size, depth and shape.
ENCODER_FIELDS = ("model_type", "hidden_size", "patch_size", "image_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads")


def _encoder_signature(encoder_dir: str) -> dict:
    config = SiglipVisionConfig.from_pretrained(encoder_dir)  # a ConfigError naming the file if it is no SigLIP
    raw = read_config_json(encoder_dir)
    vision = raw["vision_config"] if raw["model_type"] == "siglip" else raw
    return {field: (vision.get("model_type", "siglip_vision_model") if field == "model_type" else
                    getattr(config, field)) for field in ENCODER_FIELDS}


def heatmap_encoder_dir(data_dir: str, encoder_dir: str | None, how_to_give: str) -> str | None:
    """The ROI encoder whose patch features VP(z_k) is compared with (explain's heatmaps, the training probe):
    `encoder_dir` when given, else the one the dataset's ROI features were extracted with (`ROI_PROVENANCE_FILE`'s
    encoder_dir) when it is still there. None, with a warning saying how to get the heatmaps (`how_to_give`: the
    flag or config field that names an encoder), when there is neither.

    The visual projector was trained towards the recorded encoder's features, so a given encoder that differs
    from it in architecture (`ENCODER_FIELDS` of config.json) is a ConfigError: its cosines would be in another
    feature space, or fail on shapes. Another directory with an equal config is used with a warning (its weights
    may still differ); when the recorded directory is gone, the given encoder's width is checked against the
    recorded feature dim."""
    provenance = roi_provenance(data_dir) if data_dir else None
    recorded = provenance.get("encoder_dir") if provenance is not None else None
    source = os.path.join(data_dir, ROI_PROVENANCE_FILE)
    if not encoder_dir:
        if isinstance(recorded, str) and os.path.isdir(recorded):
            return recorded
        where = (f"{source} records {recorded}, which is not there" if isinstance(recorded, str) else
                 f"{data_dir} has no {ROI_PROVENANCE_FILE} naming the encoder its ROI features came from")
        logging.warning("no heatmaps of the latent steps: no ROI encoder given and %s; give %s (the MedSigLIP the "
                        "dataset's ROI features were extracted with) to draw them", where, how_to_give)
        return None
    if not isinstance(recorded, str):
        return encoder_dir  # a dataset from before the provenance file: nothing to check against
    if os.path.isdir(recorded):
        if os.path.realpath(recorded) == os.path.realpath(encoder_dir):
            return encoder_dir
        given, expected = _encoder_signature(encoder_dir), _encoder_signature(recorded)
        differ = [f"{field} {given[field]!r} (recorded: {expected[field]!r})" for field in ENCODER_FIELDS
                  if given[field] != expected[field]]
        if differ:
            raise ConfigError(f"ROI encoder {encoder_dir}: {', '.join(differ)}; the dataset's ROI features were "
                              f"extracted with {recorded} ({source}), the space the visual projector was trained "
                              f"to, so heatmaps from this encoder would compare VP(z_k) with another feature space; "
                              f"give that encoder, or none ({how_to_give} unset) to use it")
        logging.warning("ROI encoder %s is not %s, the one the dataset's ROI features were extracted with (%s), "
                        "though their configs agree; the heatmaps assume their weights do too", encoder_dir,
                        recorded, source)
        return encoder_dir
    width = _encoder_signature(encoder_dir)["hidden_size"]
    if isinstance(provenance.get("dim"), int) and width != provenance["dim"]:
        raise ConfigError(f"ROI encoder {encoder_dir}: hidden_size {width}, but the dataset's ROI features "
                          f"({source}) are {provenance['dim']}-dimensional, extracted with {recorded}; give the "
                          "encoder they were extracted with")
    logging.warning("ROI encoder %s: the one the dataset's ROI features were extracted with (%s, in %s) is gone, so "
                    "only its width could be checked; the heatmaps assume it is the same encoder", encoder_dir,
                    recorded, source)
    return encoder_dir


# ---------------------------------------------------------------------------------------------------------------
# Dataset level
# ---------------------------------------------------------------------------------------------------------------


def unique_pairs(records: Sequence[Record]) -> tuple[list[tuple[str, str]], list[int]]:
    """Distinct (image, mask) relative paths in first-seen order, and each record's row among them."""
    rows: dict[tuple[str, str], int] = {}
    index = []
    for record in records:
        key = (os.path.normpath(record.image), os.path.normpath(record.mask))
        index.append(rows.setdefault(key, len(rows)))
    return list(rows), index


def extract_dataset_rois(data_dir: str, encoder_dir: str, threshold: float = 0.2, padding: float = 0.05,
                         batch_size: int = 8, feature_layer: str = "last_block",
                         global_features: bool = False) -> RoiFeatures:
    """Compute ROI features for every record of `data_dir` and write them (the record-directory contract).

    Identical (image, mask) pairs share one row. Writes roi_features.npy (M, dv) float32, roi_top_patch_ids.npy
    (M, 5) int32, roi_top_patch_scores.npy (M, 5) float32, roi_features.json (the encoder directory, feature layer
    and settings: `records.roi_feature_layer` reads it back) and rewrites records.jsonl with `roi_index` set (other
    fields kept). With `global_features` (or when global_features.npy already exists: its rows must follow the
    new roi_index) also global_features.npy (M, dv) float32, f_global of each row's image, each distinct image
    encoded once. records.jsonl is read with `records.read_records`, so a record breaking the contract is reported
    (RecordError naming file, line and id) before any encoding. All files are first written beside their targets
    and only renamed into place once everything succeeded, so an error leaves the directory as it was; a crash
    during the renames leaves a journal that loaders refuse (`write_files_atomically`). Re-running recomputes
    everything (and clears what an interrupted run left).
    Returns the RoiFeatures of the distinct pairs.
    """
    cfg = RoiConfig(threshold=threshold, padding=padding, batch_size=batch_size)
    records = read_records(os.path.join(data_dir, RECORDS_FILE))
    if not records:
        raise RoiError(f"{os.path.join(data_dir, RECORDS_FILE)}: no records")
    pairs, roi_index = unique_pairs(records)
    first_record = {}
    for record, row in zip(records, roi_index):
        first_record.setdefault(row, record.id)
    names = [f"record {first_record[row]!r} (image {image}, mask {mask})" for row, (image, mask) in enumerate(pairs)]
    encoder, params = load_roi_encoder(encoder_dir, feature_layer)
    result = extract_roi_features([os.path.join(data_dir, image) for image, _ in pairs],
                                  [os.path.join(data_dir, mask) for _, mask in pairs], encoder, params, cfg, names)

    global_rows = None
    if global_features or os.path.exists(os.path.join(data_dir, GLOBAL_FEATURES_FILE)):
        image_rows: dict[str, int] = {}
        image_names = []  # each distinct image named by the first record that uses it
        for (image, _), name in zip(pairs, names):
            if image not in image_rows:
                image_rows[image] = len(image_rows)
                image_names.append(name)
        per_image = extract_global_features([os.path.join(data_dir, image) for image in image_rows], encoder,
                                            params, batch_size, image_names)
        global_rows = per_image[[image_rows[image] for image, _ in pairs]]

    updated = [dataclasses.replace(record, roi_index=row) for record, row in zip(records, roi_index)]
    lines = "".join(json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in updated)
    provenance = {"encoder_dir": os.path.abspath(encoder_dir), "feature_layer": feature_layer,
                  "threshold": threshold, "padding": padding, "dim": int(result.features.shape[1]),
                  "global_features": global_rows is not None}
    outputs = {
        ROI_PROVENANCE_FILE: lambda f: f.write(json.dumps(provenance, indent=2).encode("utf-8")),
        ROI_FEATURES_FILE: lambda f: np.save(f, result.features.astype(np.float32)),
        ROI_TOP_PATCH_IDS_FILE: lambda f: np.save(f, result.top_ids.astype(np.int32)),
        ROI_TOP_PATCH_SCORES_FILE: lambda f: np.save(f, result.top_scores.astype(np.float32)),
        **({} if global_rows is None else {GLOBAL_FEATURES_FILE: lambda f: np.save(f, global_rows.astype(np.float32))}),
        # records.jsonl last, so its roi_index never points past arrays that are not in place yet.
        RECORDS_FILE: lambda f: f.write(lines.encode("utf-8")),
    }
    write_files_atomically(data_dir, outputs)
    return result


def write_files_atomically(directory: str, writers: dict[str, Callable]) -> None:
    """Write each `name -> writer(binary file)` to a temporary file `.NAME.tmp-PID` in `directory`, fsync all, then
    rename them over their targets in order, as one unit: the renames happen under a journal
    (`records.ROI_WRITE_JOURNAL`, listing each target and its temporary) that is removed only once all are durable.

    An error before the renames removes the temporaries and leaves the targets (and a leftover journal) as they
    were. A crash during them leaves the journal, so `records.load_roi_arrays` (validation, the pipeline, training)
    refuses the mix of old and new files. A leftover journal is replaced by this write's own, so it goes only once
    this write's files are all in place; stray temporaries of earlier writes (of these names or a journal's) are
    removed first.
    """
    leftover = pending_roi_write(directory) or []
    _remove_stray_temporaries(directory, [*writers, *leftover])
    journal = os.path.join(directory, ROI_WRITE_JOURNAL)
    temporaries = {}
    try:
        for name, write in writers.items():
            tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
            temporaries[name] = tmp
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        listing = {"targets": {name: os.path.basename(tmp) for name, tmp in temporaries.items()}}
        atomic_write(journal, lambda f: json.dump(listing, f, indent=2))
        fsync_directory(directory)  # the journal's name is durable before any rename it covers
    except BaseException:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for name, tmp in temporaries.items():
        os.replace(tmp, os.path.join(directory, name))
    fsync_directory(directory)  # every rename is durable before the journal that covers them goes
    os.remove(journal)
    fsync_directory(directory)  # else a power loss could bring the journal back and fail a complete directory


def _remove_stray_temporaries(directory: str, names: Sequence[str]) -> None:
    """Remove `.NAME.tmp-PID` files (`write_files_atomically`'s temporaries) left by writes that were killed."""
    prefixes = tuple(f".{name}.tmp-" for name in names)
    for entry in os.listdir(directory):
        if any(entry.startswith(prefix) and entry[len(prefix):].isdigit() for prefix in prefixes):
            os.remove(os.path.join(directory, entry))


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags
    from vital_jax import cli

    from vital_jax.workdir import WorkdirInUseError, WorkdirLock

    f = flags.FLAGS
    cli.quiet_libraries()  # JAX's INFO line about absent TPU backends is not the user's business
    cli.tune_host_memory()
    try:   # bad input (records, images, the encoder directory) is one error line naming it, not a traceback
        # Not while a build (or another ROI command) writes the directory: two writers would mix their files.
        with WorkdirLock(f.data_dir, flag="--data_dir"):
            result = extract_dataset_rois(f.data_dir, f.encoder_dir, f.threshold, f.padding, f.batch_size,
                                          f.feature_layer, f.global_features)
    except (ValueError, OSError, WorkdirInUseError) as e:
        cli.fail(e)
    counts = {p: int((result.pathway == p).sum()) for p in (FULL, CROP)}
    with_global = os.path.exists(os.path.join(f.data_dir, GLOBAL_FEATURES_FILE))
    print(f"wrote {len(result.features)} ROI features (dv={result.features.shape[1]}) to {f.data_dir}: "
          f"{counts[FULL]} full-image, {counts[CROP]} tight-crop" +
          (", and their global features" if with_global else ""))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "record directory holding records.jsonl", required=True)
    flags.DEFINE_string("encoder_dir", None, "SigLIP/MedSigLIP directory (HF, or converted by hf_to_flax)",
                        required=True)
    flags.DEFINE_float("threshold", 0.2, "area threshold T")
    flags.DEFINE_float("padding", 0.05, "crop margin ratio P")
    flags.DEFINE_integer("batch_size", 8, "images per encoder batch")
    flags.DEFINE_enum("feature_layer", "last_block", list(FEATURE_LAYERS), "which SigLIP output to pool")
    flags.DEFINE_bool("global_features", False, "also write global_features.npy (f_global, Appendix C.5), needed "
                      "by vital.visual_target='interpolated'")
    from vital_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
