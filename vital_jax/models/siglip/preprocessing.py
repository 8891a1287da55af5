"""SigLIP image preprocessing, equal to transformers' `SiglipImageProcessorPil` (the PIL backend).

Steps: convert to RGB (images with alpha are composited onto white first, as HF does), plain resize to
height x width (no aspect-ratio keeping, no crop) with PIL's resampling filter (bicubic by default), rescale by
1/255 in float64 then cast to float32, normalise (x - mean) / std (mean = std = 0.5 for SigLIP and MedSigLIP).
The output is channels-last (H, W, 3) float32, ready for `SiglipVisionModel` after stacking into a batch.

16-bit images ("I;16", "I") go through PIL's RGB conversion exactly as in HF, which saturates values above 255:
window or rescale such images to 8 bits *before* calling this if their useful range is wider.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from vital_jax import image_io
from vital_jax.jsonio import read_json
from vital_jax.models import hf_config
from vital_jax.models.hf_config import ConfigError

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class SiglipPreprocessor:
    """Preprocessing settings; `from_pretrained` reads them from a checkpoint's preprocessor_config.json."""

    height: int = 224
    width: int = 224
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "SiglipPreprocessor":
        """From `model_dir/preprocessor_config.json` (a SigLIP image processor config)."""
        path = os.path.join(model_dir, PREPROCESSOR_FILE)
        cfg = read_json(path, ConfigError, "expected a HuggingFace SigLIP processor directory")
        return cls.from_hf_dict(cfg, path)

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "preprocessor config") -> "SiglipPreprocessor":
        kind = cfg.get("image_processor_type", "SiglipImageProcessor")
        if not kind.startswith("SiglipImageProcessor"):
            raise ConfigError(f"{source}: image_processor_type is {kind!r}, expected a SiglipImageProcessor")
        # Steps this implementation does not perform must be off rather than silently skipped.
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(flag) not in (None, True):
                raise ConfigError(f"{source}: {flag}={cfg[flag]!r} is not supported (only the SigLIP default)")
        for flag in ("do_center_crop", "do_pad"):
            if cfg.get(flag):
                raise ConfigError(f"{source}: {flag}=True is not supported by the SigLIP preprocessor")
        size = cfg.get("size", {"height": 224, "width": 224})
        if set(size) != {"height", "width"}:
            raise ConfigError(f"{source}: size={size} is not supported; expected {{'height': H, 'width': W}}")
        mean, std = hf_config.image_mean_std(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), source)
        return cls(height=int(size["height"]), width=int(size["width"]),
                   resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), image_mean=mean, image_std=std)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return preprocess_image(image, (self.height, self.width), self.resample, self.rescale_factor,
                                self.image_mean, self.image_std)

    def resize(self, image: Image.Image) -> np.ndarray:
        """The first half of __call__: (height, width, 3) uint8 (what a loader may keep, a quarter of float32's
        memory); `normalize` of it is __call__'s result, bit for bit."""
        return resize_image(image, (self.height, self.width), self.resample)

    def normalize(self, resized: np.ndarray) -> np.ndarray:
        """The second half of __call__, on `resize`'s uint8 output (any leading batch dimensions)."""
        return rescale_and_normalize(resized, self.rescale_factor, self.image_mean, self.image_std)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparency is composited onto a white background (as HF does)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    name = getattr(image, "filename", None) or f"<PIL image mode={image.mode} size={image.size}>"
    return image_io.to_rgb(image, name, ValueError)


def preprocess_image(image: Image.Image, size: int | tuple[int, int] = 224,
                     resample: int = int(Image.Resampling.BICUBIC), rescale_factor: float = 1 / 255,
                     mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                     std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """One PIL image (any mode) -> pixel values (height, width, 3) float32, channels-last.

    size: the square side (config.image_size) or (height, width).
    """
    return rescale_and_normalize(resize_image(image, size, resample), rescale_factor, mean, std)


def resize_image(image: Image.Image, size: int | tuple[int, int], resample: int) -> np.ndarray:
    """One PIL image (any mode) -> (height, width, 3) uint8 RGB, resized as HF's processor does."""
    height, width = (size, size) if isinstance(size, int) else size
    rgb = to_rgb(image)
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError(f"cannot preprocess an empty image of size {rgb.size}")
    return np.asarray(rgb.resize((width, height), resample=resample))  # PIL takes (width, height)


def rescale_and_normalize(resized: np.ndarray, rescale_factor: float, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> np.ndarray:
    """uint8 pixels (..., 3) -> float32 pixel values."""
    # HF rescales in float64 and casts to float32 before normalising in float32; same here for bit-equality.
    pixels = (np.asarray(resized).astype(np.float64) * rescale_factor).astype(np.float32)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_batch(images, size: int | tuple[int, int] = 224, **kwargs) -> np.ndarray:
    """A sequence of PIL images -> (B, height, width, 3) float32 (see `preprocess_image`)."""
    return np.stack([preprocess_image(im, size, **kwargs) for im in images])
