"""Synthetic abdominal phantoms (CT-, MRI- and ultrasound-like) with binary masks for named targets.

They power the demo and the tests on a fresh machine without downloads. Each phantom is an axial-looking slice:
a body ellipse holding a liver (image left), a spleen (image right), two kidneys (lower half) and, by chance,
a tumor inside the liver and a cyst inside a kidney. Organ shapes are ellipses with a smooth random radial
perturbation; tissue texture is low-pass noise. Each modality renders the same label map its own way:
  CT          HU-like values per tissue + Gaussian noise, shown through a soft-tissue window (level 40, width 400)
  MRI         T2-like signal per tissue x a smooth multiplicative bias field, Rician noise
  ultrasound  echogenicity per tissue x multiplicative speckle, depth attenuation, a sector-shaped field of view

`write_phantom_folder` writes them in the BiomedParse layout (`NAME_MODALITY_SITE.png` and
`NAME_MODALITY_SITE_TARGET.png`, '+' for spaces, masks 0/255) so ingestion treats phantoms and real data alike.
Everything is deterministic under (seed, index).

Two layouts: "standard" (the textbook picture above: liver always on the image's left) and "varied" (for
benchmarks whose answers must need the image, e.g. PhantomVQA): the anatomy is mirrored left-right with
probability 1/2 (as a situs-inversus or flipped-display scan would show it), organs move and scale more, and each
lesion is present with probability 1/2 at a random place inside its organ, with a random size; the picture is
also shown upside down with probability 1/2 and zoomed out (60-100 %) to a random place in the frame, so where a
structure lies in the image cannot be told from its name.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

PHANTOM_MODALITIES = ("CT", "MRI", "ultrasound")
SITE = "abdomen"
IMAGE_SUBDIR, MASK_SUBDIR = "demo", "demo_mask"
# Target name -> target type. The liver/kidney masks include the lesions inside them (the organ's full extent).
TARGET_TYPES = {"liver": "organ", "spleen": "organ", "kidney": "organ", "liver tumor": "lesion",
                "kidney cyst": "lesion"}
# The organ each lesion grows in: where a reader looks to say that the lesion is absent.
LESION_ORGANS = {"liver tumor": "liver", "kidney cyst": "kidney"}

# Per-tissue appearance: CT in HU, MRI and ultrasound as relative signal / echogenicity in [0, 1].
_TISSUES = ("air", "body", "liver", "spleen", "kidney", "liver tumor", "kidney cyst")
_CT_HU = {"air": -1000.0, "body": 20.0, "liver": 70.0, "spleen": 50.0, "kidney": 150.0, "liver tumor": 15.0,
          "kidney cyst": 0.0}
_MRI_SIGNAL = {"air": 0.0, "body": 0.45, "liver": 0.3, "spleen": 0.55, "kidney": 0.6, "liver tumor": 0.75,
               "kidney cyst": 0.95}
_US_ECHO = {"air": 0.0, "body": 0.45, "liver": 0.55, "spleen": 0.5, "kidney": 0.35, "liver tumor": 0.22,
            "kidney cyst": 0.03}
_CT_WINDOW = (40.0, 400.0)  # level, width (HU)
LAYOUTS = ("standard", "varied")
MIN_SIZE = 64  # pixels per side


@dataclasses.dataclass(frozen=True)
class _LayoutSpread:
    """How far a layout lets the anatomy wander: position jitter (pixels at 256 px), organ size scale range,
    lesion probabilities and radii (pixels at 256 px), and the probability of a left-right mirror."""

    organ_jitter: float
    organ_scale: tuple[float, float]
    tumor_probability: float
    tumor_radius: tuple[float, float]
    cyst_probability: float
    cyst_radius: tuple[float, float]
    mirror_probability: float
    flip_probability: float = 0.0            # upside-down display
    zoom: tuple[float, float] = (1.0, 1.0)   # field of view: the body shrinks by this factor and moves freely


_SPREADS = {"standard": _LayoutSpread(8.0, (1.0, 1.0), 0.75, (7.0, 13.0), 0.6, (4.5, 6.5), 0.0),
            "varied": _LayoutSpread(20.0, (0.8, 1.2), 0.5, (5.0, 15.0), 0.5, (4.0, 7.5), 0.5, 0.5, (0.6, 1.0))}


def _reframe(rng: np.random.Generator, labels: np.ndarray, masks: dict[str, np.ndarray], zoom: tuple[float, float]):
    """Shrink the picture by a random factor and place it at a random offset (nearest neighbour; air around)."""
    z = rng.uniform(*zoom)
    h, w = labels.shape
    oy, ox = rng.uniform(0, (1 - z) * h), rng.uniform(0, (1 - z) * w)
    yy, xx = np.mgrid[0:h, 0:w]
    sy, sx = np.floor((yy - oy) / z).astype(int), np.floor((xx - ox) / z).astype(int)
    inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    sy, sx = np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)
    labels = np.where(inside, labels[sy, sx], _TISSUES.index("air"))
    return labels, {name: inside & mask[sy, sx] for name, mask in masks.items()}


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One synthetic slice: `image` uint8 (H, W) grayscale, `masks` target name -> bool (H, W)."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    modality: str
    site: str = SITE


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT, periodic), rescaled to zero mean and unit std."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape)
    return (smooth - smooth.mean()) / (smooth.std() + 1e-12)


def _blob(rng: np.random.Generator, shape: tuple[int, int], center: tuple[float, float],
          radii: tuple[float, float], angle: float, wobble: float = 0.12) -> np.ndarray:
    """Bool mask of a rotated ellipse whose radius is perturbed by low harmonics (a smooth organ-like outline)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / radii[1], (-dx * sin + dy * cos) / radii[0]
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in (2, 3, 4):
        radius += wobble / k * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) < radius


def _inner_blob(rng: np.random.Generator, organ: np.ndarray, radius: float) -> np.ndarray:
    """A small round blob whose centre lies deep inside `organ` (so the lesion stays within the organ)."""
    ys, xs = np.nonzero(organ)
    cy, cx = ys.mean(), xs.mean()
    spread = np.array([ys.std(), xs.std()]) * 0.5
    for _ in range(50):
        center = (cy + rng.uniform(-1, 1) * spread[0], cx + rng.uniform(-1, 1) * spread[1])
        blob = _blob(rng, organ.shape, center, (radius, radius * rng.uniform(0.8, 1.2)), rng.uniform(0, np.pi),
                     wobble=0.15) & organ
        if blob.sum() >= 0.6 * np.pi * radius ** 2:  # mostly inside the organ, not cut by its outline
            return blob
    raise RuntimeError("could not place a lesion inside its organ; the organ is too small for the lesion size")


def _label_map(rng: np.random.Generator, size: int,
               layout: str = "standard") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tissue index map (H, W) into _TISSUES and the target masks."""
    spread = _SPREADS[layout]
    shape = (size, size)
    s = size / 256.0
    jitter = lambda scale: rng.uniform(-scale, scale) * s  # noqa: E731
    # The standard layout draws exactly what it always drew, so its phantoms stay the same under a seed.
    scale = (lambda: 1.0) if layout == "standard" else (lambda: rng.uniform(*spread.organ_scale))  # noqa: E731
    move = 8.0 if layout == "standard" else spread.organ_jitter
    body = _blob(rng, shape, (128 * s + jitter(4), 128 * s + jitter(4)), (92 * s, 118 * s), jitter(0.05) / s,
                 wobble=0.04)
    k = scale()
    liver = _blob(rng, shape, (100 * s + jitter(move), 78 * s + jitter(move)), (rng.uniform(38, 48) * s * k,
                  rng.uniform(30, 38) * s * k), rng.uniform(-0.5, 0.3)) & body
    k = scale()
    spleen = _blob(rng, shape, (92 * s + jitter(move), 182 * s + jitter(move)), (rng.uniform(20, 26) * s * k,
                   rng.uniform(12, 16) * s * k), rng.uniform(0.2, 0.8)) & body & ~liver
    kidney_move = 6.0 if layout == "standard" else 0.6 * spread.organ_jitter
    each_kidney = []
    for cx in (92.0, 166.0):
        k = scale()
        each_kidney.append(_blob(rng, shape, (168 * s + jitter(kidney_move), cx * s + jitter(kidney_move)),
                                 (rng.uniform(17, 21) * s * k, rng.uniform(10, 13) * s * k),
                                 rng.uniform(-0.4, 0.4)) & body & ~liver & ~spleen)
    kidneys = each_kidney[0] | each_kidney[1]
    masks = {"liver": liver, "spleen": spleen, "kidney": kidneys}
    if rng.uniform() < spread.tumor_probability:
        masks["liver tumor"] = _inner_blob(rng, liver, rng.uniform(*spread.tumor_radius) * s)
    if rng.uniform() < spread.cyst_probability:
        masks["kidney cyst"] = _inner_blob(rng, each_kidney[rng.integers(2)], rng.uniform(*spread.cyst_radius) * s)
    labels = np.where(body, _TISSUES.index("body"), _TISSUES.index("air"))
    for name, mask in masks.items():  # lesions come last, so they overwrite their organ's tissue
        labels[mask] = _TISSUES.index(name)
    if spread.mirror_probability and rng.uniform() < spread.mirror_probability:
        labels = labels[:, ::-1].copy()
        masks = {name: mask[:, ::-1].copy() for name, mask in masks.items()}
    if spread.flip_probability and rng.uniform() < spread.flip_probability:
        labels = labels[::-1].copy()
        masks = {name: mask[::-1].copy() for name, mask in masks.items()}
    if spread.zoom != (1.0, 1.0):
        labels, masks = _reframe(rng, labels, masks, spread.zoom)
    return labels, masks


def _tissue_values(labels: np.ndarray, table: dict[str, float]) -> np.ndarray:
    return np.asarray([table[t] for t in _TISSUES], np.float64)[labels]


def _soften(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (FFT) so tissue boundaries are smooth, as partial-volume effects make them."""
    fy = np.fft.fftfreq(values.shape[0])[:, None]
    fx = np.fft.rfftfreq(values.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    return np.fft.irfft2(np.fft.rfft2(values) * transfer, s=values.shape)


def _render_ct(rng, labels):
    hu = _soften(_tissue_values(labels, _CT_HU), 1.0)
    tissue = labels != _TISSUES.index("air")
    hu += tissue * 12.0 * _smooth_noise(rng, labels.shape, 3.0) + 10.0 * rng.standard_normal(labels.shape)
    level, width = _CT_WINDOW
    return np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)


def _render_mri(rng, labels):
    signal = _soften(_tissue_values(labels, _MRI_SIGNAL), 1.0)
    signal *= 1.0 + 0.06 * _smooth_noise(rng, labels.shape, 4.0) * (labels != 0)
    yy, xx = np.mgrid[0:labels.shape[0], 0:labels.shape[1]] / labels.shape[0]
    c = rng.uniform(0.2, 0.8, size=2)
    bias = 1.0 + 0.35 * (np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 0.15) - 0.5)
    signal *= bias
    sigma = 0.03
    real = signal + sigma * rng.standard_normal(labels.shape)
    imag = sigma * rng.standard_normal(labels.shape)
    return np.clip(np.hypot(real, imag) / 1.1, 0.0, 1.0)


def _probe_geometry(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Distance from and angle to a virtual probe apex above the image centre (a curved-array sector)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    apex = (-0.15 * shape[0], shape[1] / 2.0)
    return np.hypot(yy - apex[0], xx - apex[1]), np.arctan2(xx - apex[1], yy - apex[0])


def _ultrasound_sector(shape: tuple[int, int]) -> np.ndarray:
    depth, angle = _probe_geometry(shape)
    return (np.abs(angle) < np.deg2rad(38)) & (depth < 1.18 * shape[0])


def _render_ultrasound(rng, labels):
    echo = _soften(_tissue_values(labels, _US_ECHO), 1.5)
    # Fully developed speckle has exponentially distributed intensity; smoothing gives it a grain of a few pixels.
    speckle = np.clip(_soften(rng.exponential(1.0, size=labels.shape), 1.2), 0.0, None)
    speckle /= speckle.mean()
    depth, _ = _probe_geometry(labels.shape)
    attenuation = np.exp(-0.6 * depth / labels.shape[0])
    return np.clip(echo * speckle * attenuation * 1.2, 0.0, 1.0) * _ultrasound_sector(labels.shape)


_RENDERERS = {"CT": _render_ct, "MRI": _render_mri, "ultrasound": _render_ultrasound}


def make_phantom(modality: str, seed: int, index: int = 0, size: int = 256, layout: str = "standard") -> Phantom:
    """One phantom of `modality` (CT, MRI or ultrasound), a deterministic function of (seed, index, size, layout)."""
    if layout not in _SPREADS:
        raise ValueError(f"phantom layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if modality not in _RENDERERS:
        raise ValueError(f"phantom modality {modality!r} is not one of {', '.join(PHANTOM_MODALITIES)}")
    if size < MIN_SIZE:
        raise ValueError(f"phantom size {size} is too small (>= {MIN_SIZE} pixels)")
    rng = np.random.default_rng([seed, index, PHANTOM_MODALITIES.index(modality)])
    labels, masks = _label_map(rng, size, layout)
    intensity = _RENDERERS[modality](rng, labels)
    image = np.round(intensity * 255.0).astype(np.uint8)
    if modality == "ultrasound":  # tissue outside the sector is not imaged: clip masks to the field of view
        visible = _ultrasound_sector(labels.shape)
        masks = {k: m & visible for k, m in masks.items()}
        masks = {k: m for k, m in masks.items() if m.any()}
    return Phantom(image=image, masks=masks, modality=modality)


def phantom_stem(index: int, modality: str, name: str = "phantom") -> str:
    """`phantomNNNN_MODALITY_abdomen`: the BiomedParse `NAME_MODALITY_SITE` file stem (`name` replaces
    "phantom", so phantoms of different seeds can share a dataset without clashing ids)."""
    if not name.isalnum():
        raise ValueError(f"phantom name {name!r} must be alphanumeric (it becomes part of a file stem)")
    return f"{name}{index:04d}_{modality}_{SITE}"


def write_phantom_folder(root: str, count: int, seed: int = 0, size: int = 256,
                         modalities: tuple[str, ...] = PHANTOM_MODALITIES, min_mask_pixels: int = 1,
                         layout: str = "standard", name: str = "phantom") -> tuple[str, str]:
    """Write `count` phantoms (modalities in turn) under `root` in the BiomedParse layout.

    Returns (image_dir, mask_dir) = (`root/demo`, `root/demo_mask`). Images are 8-bit grayscale PNGs, masks 0/255
    PNGs named `STEM_TARGET.png` with '+' for spaces; masks with fewer than `min_mask_pixels` pixels are not written.
    """
    image_dir, mask_dir = os.path.join(root, IMAGE_SUBDIR), os.path.join(root, MASK_SUBDIR)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for index in range(count):
        modality = modalities[index % len(modalities)]
        phantom = make_phantom(modality, seed, index, size, layout)
        stem = phantom_stem(index, modality, name)
        Image.fromarray(phantom.image, mode="L").save(os.path.join(image_dir, stem + ".png"))
        for target, mask in phantom.masks.items():
            if mask.sum() >= min_mask_pixels:
                mask_name = f"{stem}_{target.replace(' ', '+')}.png"
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(os.path.join(mask_dir, mask_name))
    return image_dir, mask_dir
