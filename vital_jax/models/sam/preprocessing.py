"""SAM image preprocessing, equal to transformers' `SamImageProcessorPil` (the PIL backend).

Steps: convert to RGB (alpha composited onto white, as HF does), resize so the longest side is `longest_edge`
keeping the aspect ratio (new side = int(side * longest_edge / max(H, W) + 0.5), PIL bilinear by default), rescale
by 1/255, normalise with the ImageNet mean/std, then zero-pad at the bottom and right to `pad_size` x `pad_size`
(the encoder's square input). The image therefore occupies the top-left `content_size(H, W)` pixels of the canvas;
region masks must be mapped the same way (see `content_size`).
Output: channels-last (pad_size, pad_size, 3) float32, ready for `SamVisionEncoder` after stacking into a batch.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from vital_jax.jsonio import read_json
from vital_jax.models import hf_config
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.siglip.preprocessing import to_rgb

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SamPreprocessor:
    """Preprocessing settings; `from_pretrained` reads them from a checkpoint's preprocessor_config.json."""

    longest_edge: int = 1024
    pad_size: int = 1024
    resample: int = int(Image.Resampling.BILINEAR)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.longest_edge > self.pad_size:
            raise ConfigError(f"longest_edge={self.longest_edge} exceeds pad_size={self.pad_size}")

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "SamPreprocessor":
        """From `model_dir/preprocessor_config.json` (a SAM image processor config)."""
        path = os.path.join(model_dir, PREPROCESSOR_FILE)
        cfg = read_json(path, ConfigError, "expected a HuggingFace SAM processor directory")
        return cls.from_hf_dict(cfg, path)

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "preprocessor config") -> "SamPreprocessor":
        kind = cfg.get("image_processor_type", "SamImageProcessor")
        if not kind.startswith("SamImageProcessor"):
            raise ConfigError(f"{source}: image_processor_type is {kind!r}, expected a SamImageProcessor")
        # Steps this implementation does not perform must be on rather than silently skipped.
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if cfg.get(flag) not in (None, True):
                raise ConfigError(f"{source}: {flag}={cfg[flag]!r} is not supported (only the SAM default)")
        if cfg.get("do_center_crop"):
            raise ConfigError(f"{source}: do_center_crop=True is not supported by the SAM preprocessor")
        size = cfg.get("size") or {"longest_edge": 1024}
        pad = cfg.get("pad_size") or {"height": 1024, "width": 1024}
        if set(size) != {"longest_edge"}:
            raise ConfigError(f"{source}: size={size} is not supported; expected {{'longest_edge': N}}")
        if set(pad) != {"height", "width"} or pad["height"] != pad["width"]:
            raise ConfigError(f"{source}: pad_size={pad} is not supported; expected a square {{'height', 'width'}}")
        mean, std = hf_config.image_mean_std(cfg, IMAGENET_MEAN, IMAGENET_STD, source)
        return cls(longest_edge=int(size["longest_edge"]), pad_size=int(pad["height"]),
                   resample=int(cfg.get("resample", Image.Resampling.BILINEAR)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), image_mean=mean, image_std=std)

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the canvas that an image of `height` x `width` pixels fills (top-left aligned)."""
        scale = self.longest_edge / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image (any mode) -> (pad_size, pad_size, 3) float32, channels-last."""
        rgb = to_rgb(image)
        if rgb.width == 0 or rgb.height == 0:
            raise ValueError(f"cannot preprocess an empty image of size {rgb.size}")
        rows, cols = self.content_size(rgb.height, rgb.width)
        resized = np.asarray(rgb.resize((cols, rows), resample=self.resample))  # PIL takes (width, height)
        pixels = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        canvas = np.zeros((self.pad_size, self.pad_size, 3), np.float32)
        canvas[:rows, :cols] = pixels
        return canvas
