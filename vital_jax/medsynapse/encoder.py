"""E_ana, MedSynapse-V's frozen anatomical encoder (§2.2), and the region masks of its counterfactual (§2.3, Eq. 5).

An `AnatomicalEncoder` maps preprocessed pixels to the spatial feature map F = E_ana(X) in R^{Hf x Wf x df}
(`feature_map`), which the Diagnostic Memory Sampler flattens into S (M = Hf * Wf tokens, raster order). Two
implementations, both frozen and pure functions of explicit params (so that jit does not bake the weights into
the program as constants):

  SiglipAnatomicalEncoder  our SigLIP / MedSigLIP tower: the (image_size / patch_size)^2 patch tokens as a grid,
                           before the MAP-head pooling. Pixels: plain resize to S x S (bicubic), mean = std = 0.5.
  SamAnatomicalEncoder     the SAM-1 ViT image encoder (MedSAM v1's architecture; `vital_jax.models.sam`): the
                           neck output, 256-d at a 64 x 64 grid for 1024 px. Pixels: longest side resized to S
                           (bilinear), ImageNet mean/std, zero padding at the bottom and right to S x S.

The paper's encoder is MedSAM3 (SAM 3 + LoRA); SAM-1 is the architecture of MedSAM v1 and of the authors' public
skeleton (a "vit_b" SAM-1, see ../shared/NOTES.md), hence the SAM choice here.

Region masks (Eq. 5): "E_ana additionally provides highest-confidence region masks for diagnostically relevant
areas; zeroing out the corresponding features yields M' = P_phi(E_ana(X) ⊙ B̄), B̄ the inverted binary mask."
A `RegionMaskProvider` gives, per image, R candidate regions on the feature grid with a confidence each
(`RegionMasks`); `counterfactual_keep_mask` keeps everything except the top-k most confident regions (B̄) and
`intervene` applies it (F ⊙ B̄). Providers:

  RecordRegionMasks   (default) the dataset's own segmentation mask: one region, confidence 1.
  EncoderRegionMasks  the encoder's own mask head, for encoders that have one (neither SigLIP nor the SAM-1 image
                      encoder alone does: SAM's mask decoder needs point/box prompts). Masks computed offline by a
                      segmenter (MedSAM3) can be written as the records' mask files and read by RecordRegionMasks.

Where the paper is vague, and what is done here:
  - "highest-confidence region masks": which confidence is not defined (a segmenter's predicted IoU or detection
    score; a ground-truth mask is certain). One region per image is removed by default (`top_k=1`).
  - The resolution at which B is applied is not given. A mask (image pixels) is mapped through the encoder's own
    preprocessing geometry onto its feature grid; a cell is in the region when the mask covers at least half of
    its area (`threshold=0.5`, exact area fractions). A non-empty mask that reaches the threshold nowhere (a small
    lesion) marks its best-covered cell(s) instead, so the intervention is never silently empty.
  - Zeroed features still enter P_phi as zero tokens: the paper multiplies features by B̄ and does not drop them.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vital_jax.data.images import load_image
from vital_jax.data.roi import load_mask, mask_cells
from vital_jax.models import hf_config, model_dir
from vital_jax.models.sam import SamPreprocessor, SamVisionConfig, SamVisionEncoder, load_sam_vision
from vital_jax.models.sam import params as sam_params
from vital_jax.models.siglip import SiglipPreprocessor, SiglipVisionConfig, SiglipVisionModel, load_siglip_vision
from vital_jax.models.siglip import params as siglip_params

KINDS = ("siglip", "sam")
# Which layer's output is F, per kind (the first is the default; see the encoder classes).
FEATURE_LAYERS = {"siglip": ("post_layernorm", "last_block"), "sam": ("neck", "encoder")}
REGION_SOURCES = ("record", "encoder")


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------


class AnatomicalEncoder(abc.ABC):
    """E_ana: preprocessed pixels (B, S, S, 3) float32 -> feature map (B, Hf, Wf, df).

    Implementations are frozen dataclasses (hashable, usable as static jit arguments); the weights travel
    separately as `params`. `preprocess` turns one image into the (S, S, 3) pixels `feature_map` expects, and
    `content_size` says which top-left part of that S x S canvas the image fills, so that masks in image pixels
    can be mapped onto the feature grid.
    """

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """S, the side of the square input canvas."""

    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """(Hf, Wf) of the feature map."""

    @property
    @abc.abstractmethod
    def feature_dim(self) -> int:
        """df, the channels of the feature map."""

    @abc.abstractmethod
    def preprocess(self, image) -> np.ndarray:
        """An image (path, PIL image or uint8 array (H, W[, C])) -> (S, S, 3) float32 pixels, channels-last."""

    @abc.abstractmethod
    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the canvas's top-left block that an image of `height` x `width` pixels fills."""

    @abc.abstractmethod
    def feature_map(self, params, pixels_bhwc: jax.Array) -> jax.Array:
        """F = E_ana(X): (B, S, S, 3) -> (B, Hf, Wf, df), raster order matching `grid`."""

    def region_masks(self, params, pixels_bhwc: jax.Array) -> "RegionMasks | None":
        """Regions from the encoder's own mask head, or None when it has none (the default)."""
        return None

    def settings(self) -> dict:
        """Everything F depends on besides the weights, as JSON data: the class and its dataclass fields (the
        model's config, compute dtype included, the preprocessing, the feature layer).

        The feature store's key (`features.build_feature_store`): SigLIP's two feature layers share grid and
        dim, so a key of shapes alone reused a store of one layer for the other. Dtypes are written by name and a
        value that is not plain data is refused: its repr (a function's, say) could hold a memory address, and a
        key that differs every run would rebuild the store every run.
        """
        return {"class": type(self).__name__, **_settings_json(self)}


def _settings_json(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_settings_json(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A flax module's `parent` and `name` say where it sits in a bigger module, not what it computes.
        skip = ("parent", "name") if isinstance(value, nn.Module) else ()
        return {f.name: _settings_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in skip}
    try:
        return jnp.dtype(value).name  # jnp.float32 and friends are classes, not np.dtype instances
    except TypeError:
        raise TypeError(f"cannot describe {type(value).__name__} {value!r} as plain data (the feature store's key "
                        "needs every setting of the encoder as JSON)") from None


class _VitEncoder(AnatomicalEncoder):
    """What the SigLIP and SAM encoders share: a `model` whose config gives the square canvas (`image_size`) and
    its patch grid (`grid_size`), and a `preprocessor` that turns a PIL image into that canvas."""

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.config.grid_size, self.model.config.grid_size

    def preprocess(self, image) -> np.ndarray:
        # Through the data loader first: the checks and the 16-bit window every stage applies.
        return self.preprocessor(Image.fromarray(load_image(image)))


@dataclasses.dataclass(frozen=True)
class SiglipAnatomicalEncoder(_VitEncoder):
    """The SigLIP / MedSigLIP patch grid as E_ana: (B, S, S, 3) -> (B, g, g, hidden_size), g = S / patch.

    feature_layer: "post_layernorm" (HF's `last_hidden_state`, the default: the final layer's output, as §2.2
    says) or "last_block" (the residual stream before it, VITAL's ROI-feature choice).
    """

    model: SiglipVisionModel
    preprocessor: SiglipPreprocessor
    feature_layer: str = "post_layernorm"

    def __post_init__(self):
        if self.feature_layer not in FEATURE_LAYERS["siglip"]:
            raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS['siglip']}, got {self.feature_layer!r}")
        size = self.model.config.image_size
        if (self.preprocessor.height, self.preprocessor.width) != (size, size):
            raise hf_config.ConfigError(f"preprocessor size {self.preprocessor.height}x{self.preprocessor.width} "
                                        f"does not match the encoder's image_size {size}")

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        return self.image_size, self.image_size  # plain resize: the image fills the canvas

    def feature_map(self, params, pixels_bhwc: jax.Array) -> jax.Array:
        if self.feature_layer == "post_layernorm":
            tokens = self.model.apply({"params": params}, pixels_bhwc).last_hidden_state
        else:
            _, state = self.model.apply({"params": params}, pixels_bhwc,
                                        capture_intermediates=lambda module, _: module.name == "encoder")
            tokens = state["intermediates"]["encoder"]["__call__"][0]
        return tokens.reshape(tokens.shape[0], *self.grid, self.feature_dim)


@dataclasses.dataclass(frozen=True)
class SamAnatomicalEncoder(_VitEncoder):
    """The SAM-1 (MedSAM) image encoder as E_ana: (B, S, S, 3) -> (B, g, g, df), g = S / patch.

    feature_layer: "neck" (the image embedding SAM's mask decoder reads, df = output_channels; the default) or
    "encoder" (the last ViT block before the neck, df = hidden_size).
    """

    model: SamVisionEncoder
    preprocessor: SamPreprocessor
    feature_layer: str = "neck"

    def __post_init__(self):
        if self.feature_layer not in FEATURE_LAYERS["sam"]:
            raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS['sam']}, got {self.feature_layer!r}")
        if self.preprocessor.pad_size != self.model.config.image_size:
            raise hf_config.ConfigError(f"preprocessor pad_size {self.preprocessor.pad_size} does not match the "
                                        f"encoder's image_size {self.model.config.image_size}")

    @property
    def feature_dim(self) -> int:
        cfg = self.model.config
        return cfg.output_channels if self.feature_layer == "neck" else cfg.hidden_size

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        return self.preprocessor.content_size(height, width)

    def feature_map(self, params, pixels_bhwc: jax.Array) -> jax.Array:
        out = self.model.apply({"params": params}, pixels_bhwc)
        return out.last_hidden_state if self.feature_layer == "neck" else out.encoder_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------


def _get(config, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _load_converted(directory: str, config, abstract_fn) -> dict:
    return jax.tree.map(np.asarray, model_dir.load_params(directory, abstract_fn(config)))


def load_anatomical_encoder(kind: str, directory: str, feature_layer: str | None = None,
                            dtype="float32") -> tuple[AnatomicalEncoder, dict]:
    """(encoder, params) from a model directory.

    kind: "siglip" or "sam". directory: a HF checkpoint (config.json, safetensors, preprocessor_config.json) or a
    vital_jax converted-model directory (`python -m conversion.hf_to_flax`, which keeps the processor file).
    feature_layer: see the encoder classes (None: their default). dtype: parameter and compute dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown anatomical encoder kind {kind!r}; expected one of {KINDS}")
    dtype = hf_config.as_dtype(dtype)
    converted = os.path.exists(os.path.join(directory, model_dir.META_FILE))
    layer = {} if feature_layer is None else {"feature_layer": feature_layer}
    if kind == "siglip":
        if converted:
            config = SiglipVisionConfig.from_pretrained(directory, dtype=dtype, param_dtype=dtype)
            params = _load_converted(directory, config, siglip_params.abstract_params)
            params.pop("head", None)  # the MAP head pools; E_ana needs the token grid only
            config = dataclasses.replace(config, use_head=False)
        else:
            config, params = load_siglip_vision(directory, dtype=dtype, use_head=False)
        encoder = SiglipAnatomicalEncoder(SiglipVisionModel(config), SiglipPreprocessor.from_pretrained(directory),
                                          **layer)
    else:
        if converted:
            config = SamVisionConfig.from_pretrained(directory, dtype=dtype, param_dtype=dtype)
            params = _load_converted(directory, config, sam_params.abstract_params)
        else:
            config, params = load_sam_vision(directory, dtype=dtype)
        encoder = SamAnatomicalEncoder(SamVisionEncoder(config), SamPreprocessor.from_pretrained(directory), **layer)
    return encoder, jax.tree.map(jnp.asarray, params)


def anatomical_encoder_from_config(config) -> tuple[AnatomicalEncoder, dict]:
    """From a config section (ml_collections ConfigDict or mapping) with fields `kind` ("siglip" | "sam"), `dir`
    and optionally `feature_layer` and `dtype` (default float32)."""
    kind, directory = _get(config, "kind"), _get(config, "dir")
    if not directory:
        raise ValueError("the anatomical encoder config needs `dir` (a HF or converted model directory)")
    return load_anatomical_encoder(kind, directory, _get(config, "feature_layer"), _get(config, "dtype", "float32"))


# ---------------------------------------------------------------------------------------------------------------
# Region masks on the feature grid
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegionMasks:
    """Candidate regions of one image on an encoder's feature grid: masks (R, Hf, Wf) bool, confidence (R,)
    float32 (higher = more confident)."""

    masks: np.ndarray
    confidence: np.ndarray

    def __post_init__(self):
        if self.masks.ndim != 3 or self.confidence.shape != self.masks.shape[:1]:
            raise ValueError(f"expected masks (R, Hf, Wf) and confidence (R,), got {self.masks.shape} and "
                             f"{self.confidence.shape}")


def _overlap_weights(n_pixels: int, content: int, n_cells: int, canvas: int) -> np.ndarray:
    """(n_cells, n_pixels): the fraction of cell i's extent covered by image pixel p along one axis.

    The n_pixels image pixels are stretched over canvas [0, content); cell i spans canvas
    [i * canvas / n_cells, (i + 1) * canvas / n_cells); the canvas beyond `content` is padding.
    """
    pixel_edges = np.arange(n_pixels + 1) * (content / n_pixels)
    cell_edges = np.arange(n_cells + 1) * (canvas / n_cells)
    lo = np.maximum(cell_edges[:-1, None], pixel_edges[None, :-1])
    hi = np.minimum(cell_edges[1:, None], pixel_edges[None, 1:])
    return np.clip(hi - lo, 0.0, None) / (canvas / n_cells)


def grid_coverage(mask: np.ndarray, content: tuple[int, int], canvas: int, grid: tuple[int, int]) -> np.ndarray:
    """The fraction of each feature cell's area that a mask covers: (H, W) -> (Hf, Wf) float32 in [0, 1].

    The image (and so the mask) is stretched over the top-left `content` = (rows, cols) block of the square
    `canvas` x `canvas` encoder input; the rest is padding, covered by nothing. Exact area fractions (no
    resampling of the mask): with a plain resize the cell bounds fall mid-pixel when H is not a multiple of Hf.
    """
    mask = np.asarray(mask, np.float64)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"a mask must be a non-empty (H, W) array, got shape {mask.shape}")
    rows, cols = content
    if not (0 < rows <= canvas and 0 < cols <= canvas):
        raise ValueError(f"content {content} does not fit a {canvas}x{canvas} canvas")
    w_rows = _overlap_weights(mask.shape[0], rows, grid[0], canvas)
    w_cols = _overlap_weights(mask.shape[1], cols, grid[1], canvas)
    return (w_rows @ mask @ w_cols.T).astype(np.float32)


def mask_to_grid(mask: np.ndarray, encoder: AnatomicalEncoder, threshold: float = 0.5) -> np.ndarray:
    """An image-pixel mask (H, W) -> the encoder's feature-grid mask (Hf, Wf) bool.

    A cell is in the region when the mask covers >= `threshold` of its area (after the encoder's preprocessing
    geometry). A piece of the mask (8-connected) that covers no cell that much is in the cell(s) it covers most
    (`roi.mask_cells`), so a region smaller than half a cell, alone or beside a larger one, still removes
    something. An empty mask gives an empty grid mask.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    content = encoder.content_size(*np.shape(mask))
    return mask_cells(np.asarray(mask, bool), lambda m: grid_coverage(m, content, encoder.image_size,
                                                                      encoder.grid), threshold)[0]


class RegionMaskProvider(abc.ABC):
    """Where the counterfactual's regions come from: (encoder, params, image, mask) -> RegionMasks.

    image: the original image (path, PIL image or array); mask: the record's segmentation mask (path, PIL image
    or (H, W) array, same size as the image) or None.
    """

    @abc.abstractmethod
    def __call__(self, encoder: AnatomicalEncoder, params, image, mask=None) -> RegionMasks:
        ...


def _image_size(image) -> tuple[int, int]:
    """(H, W) of an image source, reading only the header of a file."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(os.fspath(image)) as img:
            return img.height, img.width
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(np.shape(image)[:2])


@dataclasses.dataclass(frozen=True)
class RecordRegionMasks(RegionMaskProvider):
    """The dataset's own segmentation mask as the single region (confidence 1): the default source.

    Masks are read as in the ROI stage (`vital_jax.data.roi.load_mask`: 0/255 PNGs are foreground where >= 128)
    and mapped onto the feature grid with `mask_to_grid`.
    """

    threshold: float = 0.5

    def __call__(self, encoder: AnatomicalEncoder, params, image, mask=None) -> RegionMasks:
        if mask is None:
            raise ValueError("RecordRegionMasks needs the record's segmentation mask")
        mask_hw = load_mask(mask, name=str(mask) if isinstance(mask, (str, os.PathLike)) else "mask")
        size = _image_size(image)
        if mask_hw.shape != size:
            raise ValueError(f"mask is {mask_hw.shape[1]}x{mask_hw.shape[0]} (WxH) but the image is "
                             f"{size[1]}x{size[0]}")
        grid_mask = mask_to_grid(mask_hw, encoder, self.threshold)
        return RegionMasks(grid_mask[None], np.ones((1,), np.float32))


@dataclasses.dataclass(frozen=True)
class EncoderRegionMasks(RegionMaskProvider):
    """Regions from the encoder's own mask head (`AnatomicalEncoder.region_masks`); the record mask is unused."""

    def __call__(self, encoder: AnatomicalEncoder, params, image, mask=None) -> RegionMasks:
        pixels = jnp.asarray(encoder.preprocess(image))[None]
        regions = encoder.region_masks(params, pixels)
        if regions is None:
            raise ValueError(f"{type(encoder).__name__} has no mask head; use regions.source = 'record' "
                             "(the dataset's masks, or masks precomputed offline written as the records' masks)")
        return regions


def region_mask_provider_from_config(config=None) -> RegionMaskProvider:
    """From a config section with `source` ("record", the default, or "encoder") and optionally `threshold`."""
    source = _get(config, "source", "record") if config is not None else "record"
    if source == "record":
        return RecordRegionMasks(float(_get(config, "threshold", 0.5) if config is not None else 0.5))
    if source == "encoder":
        return EncoderRegionMasks()
    raise ValueError(f"unknown region mask source {source!r}; expected one of {REGION_SOURCES}")


def stack_region_masks(regions: Sequence[RegionMasks], num_regions: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch per-image regions, padding R: -> masks (B, R, Hf, Wf) bool, confidence (B, R) float32,
    valid (B, R) bool (False for padding slots). num_regions: fixed R (default: the largest count)."""
    if not regions:
        raise ValueError("no regions to stack")
    grids = {r.masks.shape[1:] for r in regions}
    if len(grids) != 1:
        raise ValueError(f"regions on different grids: {sorted(grids)}")
    count = max(r.masks.shape[0] for r in regions) if num_regions is None else num_regions
    if any(r.masks.shape[0] > count for r in regions):
        raise ValueError(f"an image has more than num_regions={count} regions")
    masks = np.zeros((len(regions), count, *grids.pop()), bool)
    confidence = np.zeros((len(regions), count), np.float32)
    valid = np.zeros((len(regions), count), bool)
    for i, r in enumerate(regions):
        n = r.masks.shape[0]
        masks[i, :n], confidence[i, :n], valid[i, :n] = r.masks, r.confidence, True
    return masks, confidence, valid


# ---------------------------------------------------------------------------------------------------------------
# The counterfactual intervention (Eq. 5)
# ---------------------------------------------------------------------------------------------------------------


def counterfactual_keep_mask(region_masks: jax.Array, confidence: jax.Array, valid: jax.Array | None = None,
                             top_k: int = 1) -> jax.Array:
    """B̄ of Eq. (5): True where features are kept, False on the `top_k` most confident regions.

    region_masks (..., R, Hf, Wf) bool; confidence (..., R) float; valid (..., R) bool (default all valid).
    Returns (..., Hf, Wf) bool. Ties go to the lower region index; invalid regions are never removed, so an image
    without a valid region keeps every feature (its interventional memory equals the original: r_causal = 0).
    """
    region_masks = jnp.asarray(region_masks, bool)
    confidence = jnp.asarray(confidence, jnp.float32)
    count = region_masks.shape[-3]
    if confidence.shape[-1] != count:
        raise ValueError(f"{count} regions but confidence has shape {confidence.shape}")
    if valid is None:
        valid = jnp.ones(confidence.shape, bool)
    k = min(top_k, count)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    scores = jnp.where(valid, confidence, -jnp.inf)
    _, chosen_idx = jax.lax.top_k(scores, k)  # (..., k); lax.top_k puts the lower index first on ties
    chosen = jnp.any(jax.nn.one_hot(chosen_idx, count, dtype=bool), axis=-2) & valid  # (..., R)
    removed = jnp.any(region_masks & chosen[..., None, None], axis=-3)
    return ~removed


def intervene(features_bhwd: jax.Array, keep_bhw: jax.Array) -> jax.Array:
    """F ⊙ B̄ (Eq. 5): zero the features of removed cells. (B, Hf, Wf, df), (B, Hf, Wf) bool -> (B, Hf, Wf, df)."""
    return features_bhwd * keep_bhw[..., None].astype(features_bhwd.dtype)


__all__ = ["AnatomicalEncoder", "EncoderRegionMasks", "RecordRegionMasks", "RegionMaskProvider", "RegionMasks",
           "SamAnatomicalEncoder", "SiglipAnatomicalEncoder", "anatomical_encoder_from_config",
           "counterfactual_keep_mask", "grid_coverage", "intervene", "load_anatomical_encoder", "mask_to_grid",
           "region_mask_provider_from_config", "stack_region_masks"]
