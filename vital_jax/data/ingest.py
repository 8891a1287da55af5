"""Ingestion: segmentation datasets -> images with named target masks (App. A.1, "From segmentation to QA tuples").

Two sources, one output type (`SourceImage`: an RGB image and its `Target`s, each a binary mask with a target
name, target type and whether it is normal anatomy):
  BiomedParse layout  `NAME_MODALITY_SITE.png` images and `NAME_MODALITY_SITE_TARGET.png` masks ('+' = space,
                      0/255) in two folders; modality and site are parsed from the name. Phantoms use it too.
  MSD                 a task folder with `dataset.json` and NIfTI volumes; axial slices whose target mask has
                      at least `min_mask_pixels` (100) pixels, CT windowing, label names from dataset.json.
Every error names the file it is about.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator

import numpy as np
from absl import logging
from PIL import Image

from vital_jax.data import nifti
from vital_jax.data.records import MODALITIES
from vital_jax.jsonio import read_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MSD_MIN_MASK_PIXELS = 100
CT_WINDOW = (40.0, 400.0)  # level, width in HU: the abdominal soft-tissue window
# Lower-case spellings -> canonical modality. Sequence suffixes ("MRI-FLAIR", "MRI-T1-Gd") are stripped first.
_MODALITY_ALIASES = {m.lower(): m for m in MODALITIES} | {
    "xray": "X-Ray", "x-ray": "X-Ray", "cxr": "X-Ray", "us": "ultrasound", "mr": "MRI", "endoscopy": "endoscope",
    "histopathology": "pathology", "dermatology": "dermoscopy"}
# MSD dataset.json modality values that are MR sequences.
_MSD_MR_NAMES = {"mri", "mr", "flair", "t1w", "t1gd", "t2w", "t2", "adc", "mp-mri", "t1", "dwi"}
# Words that make a target a lesion (pathological finding); organ names; anything else is "other"
# (vessels, tissues, cells, retinal structures, fetal head...).
_LESION_WORDS = {"tumor", "tumour", "cancer", "nodule", "cyst", "lesion", "mass", "glioma", "infection", "pneumonia",
                 "polyp", "melanoma", "metastasis", "carcinoma", "edema", "oedema", "pneumothorax", "effusion",
                 "fracture", "hemorrhage", "haemorrhage", "neoplasm", "covid-19", "nevus", "ulcer", "opacity"}
_ORGAN_WORDS = {"liver", "kidney", "spleen", "pancreas", "lung", "heart", "ventricle", "atrium", "myocardium",
                "stomach", "gallbladder", "duodenum", "colon", "bladder", "prostate", "uterus", "esophagus",
                "adrenal", "brain", "hippocampus", "aorta", "postcava", "thyroid", "breast", "rectum", "bowel"}


class IngestError(ValueError):
    """Bad source data: the message names the offending file."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One segmented target of an image: `mask` bool (H, W)."""

    name: str
    target_type: str
    mask: np.ndarray
    normal_anatomy: bool
    mask_origin: str


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """An image (uint8 (H, W, 3) RGB) with its targets; `origin` is the file it came from (for messages)."""

    image_id: str
    image: np.ndarray
    modality: str
    site: str
    source: str
    targets: tuple[Target, ...]
    origin: str


def parse_modality(token: str, origin: str) -> str:
    """Canonical modality for a name token ("MRI-FLAIR" -> "MRI", "X-Ray" -> "X-Ray"); IngestError if unknown."""
    key = token.lower()
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    head = key.split("-", 1)[0]
    if head in _MODALITY_ALIASES and head != "x":
        return _MODALITY_ALIASES[head]
    raise IngestError(f"{origin}: unknown modality {token!r} (known: {', '.join(MODALITIES)})")


def classify_target(name: str) -> str:
    """Target type from the target name: "lesion" if a word names a finding, "organ" if one names an organ, else
    "other" (a lesion word wins: "kidney cyst" is a lesion)."""
    words = set(re.split(r"[\s+_]+", name.lower()))
    words |= {w.split("-")[-1] for w in words}  # "non-enhancing" -> also "enhancing"; "lower-grade" -> "grade"
    if words & _LESION_WORDS:
        return "lesion"
    if words & _ORGAN_WORDS:
        return "organ"
    return "other"


def load_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3). 8-bit gray, palette and RGBA images are converted (alpha dropped); 16-bit and float
    images are refused, since converting them to 8 bits needs a window this function cannot guess."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "LA", "P", "RGB", "RGBA", "1"):
                raise IngestError(f"{path}: image mode {im.mode} is not 8-bit; window it to 8 bits first")
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise IngestError(f"{path}: image file not found") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise IngestError(f"{path}: corrupt or unreadable image ({e})") from e


def load_mask(path: str, image_shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W) from a 0/255 (or 0/1) mask file; errors for other values, a size mismatch or an empty mask."""
    try:
        with Image.open(path) as im:
            im.load()
            values = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
    except (OSError, SyntaxError, ValueError) as e:
        raise IngestError(f"{path}: corrupt or unreadable mask ({e})") from e
    if values.shape != tuple(image_shape):
        raise IngestError(f"{path}: mask size {values.shape[::-1]} differs from its image's {tuple(image_shape)[::-1]}")
    levels = set(np.unique(values).tolist())
    if not (levels <= {0, 255} or levels <= {0, 1}):
        raise IngestError(f"{path}: not a binary mask (values {sorted(levels)[:6]}...; expected 0/255)")
    mask = values > 0
    if not mask.any():
        raise IngestError(f"{path}: empty mask (no foreground pixel)")
    return mask


def parse_biomedparse_stem(stem: str, origin: str) -> tuple[str, str, str]:
    """`NAME_MODALITY_SITE` -> (name, modality, site); NAME may itself contain underscores."""
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not all(parts):
        raise IngestError(f"{origin}: file name is not NAME_MODALITY_SITE")
    return parts[0], parse_modality(parts[1], origin), parts[2]


def iter_biomedparse(image_dir: str, mask_dir: str, source: str = "biomedparse",
                     normal_anatomy: bool = False) -> Iterator[SourceImage]:
    """Images of a BiomedParse-layout folder pair, sorted by name, each with all its masks.

    `normal_anatomy=True` marks organ targets as normal anatomy (the pathology-term filter then applies to them,
    as for MSD); BiomedParse data hold pathological findings, so it is False by default (App. A.3, round 3).
    A mask whose image is missing is an error; an image without masks is skipped with a warning.
    """
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise IngestError(f"{folder}: folder not found")
    images = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
    stems = {os.path.splitext(n)[0]: n for n in images}
    masks_by_stem: dict[str, list[tuple[str, str]]] = {s: [] for s in stems}
    for name in sorted(os.listdir(mask_dir)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        stem, _, target = os.path.splitext(name)[0].rpartition("_")
        if stem not in stems or not target:
            raise IngestError(f"{os.path.join(mask_dir, name)}: no image {stem or name}.* in {image_dir} for this mask")
        masks_by_stem[stem].append((target.replace("+", " "), os.path.join(mask_dir, name)))
    for stem, image_name in stems.items():
        path = os.path.join(image_dir, image_name)
        name, modality, site = parse_biomedparse_stem(stem, path)
        if not masks_by_stem[stem]:
            logging.warning("%s: no masks in %s; image skipped", path, mask_dir)
            continue
        image = load_rgb(path)
        targets = []
        for target_name, mask_path in masks_by_stem[stem]:
            target_type = classify_target(target_name)
            targets.append(Target(name=target_name, target_type=target_type,
                                  mask=load_mask(mask_path, image.shape[:2]),
                                  normal_anatomy=normal_anatomy and target_type == "organ", mask_origin=mask_path))
        yield SourceImage(image_id=stem, image=image, modality=modality, site=site, source=source,
                          targets=tuple(targets), origin=path)


def _axis_codes(affine: np.ndarray) -> list[tuple[int, float]]:
    """For each voxel axis: (the world axis it mostly follows, 0=x 1=y 2=z in RAS+, the direction's sign)."""
    directions = affine[:3, :3]
    codes = []
    for axis in range(3):
        world = int(np.argmax(np.abs(directions[:, axis])))
        codes.append((world, float(np.sign(directions[world, axis]))))
    return codes


def axial_slices(volume: np.ndarray, affine: np.ndarray, origin: str) -> np.ndarray:
    """(S, H, W) axial slices in radiological display: image top = anterior, image left = patient's right.

    `volume` is (i, j, k) in voxel order; its affine maps voxels to RAS+ world coordinates.
    """
    codes = _axis_codes(affine)
    world_to_voxel = {world: (axis, sign) for axis, (world, sign) in enumerate(codes)}
    if sorted(world_to_voxel) != [0, 1, 2]:
        raise IngestError(f"{origin}: oblique affine, voxel axes do not map one-to-one onto x/y/z")
    (x_axis, x_sign), (y_axis, y_sign), (z_axis, _) = (world_to_voxel[w] for w in (0, 1, 2))
    out = np.transpose(volume, (z_axis, y_axis, x_axis))
    # Rows must run anterior -> posterior (decreasing y), columns patient right -> left (decreasing x).
    if y_sign > 0:
        out = out[:, ::-1, :]
    if x_sign > 0:
        out = out[:, :, ::-1]
    return out


def window_ct(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """uint8 from Hounsfield units through a (level, width) window."""
    scaled = (hu.astype(np.float64) - (level - width / 2.0)) / width
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_mr(volume: np.ndarray) -> np.ndarray:
    """uint8 from MR signal: the 0.5-99.5 percentile range of the nonzero voxels of the whole volume -> 0..255."""
    nonzero = volume[volume != 0]
    if nonzero.size == 0:
        return np.zeros(volume.shape, np.uint8)
    low, high = np.percentile(nonzero, [0.5, 99.5])
    scaled = (volume.astype(np.float64) - low) / max(high - low, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_msd_dataset_json(task_dir: str) -> dict:
    """The task's dataset.json, checked for the fields ingestion needs."""
    path = os.path.join(task_dir, "dataset.json")
    meta = read_json(path, IngestError, "an MSD task folder holds dataset.json")
    for key in ("labels", "modality", "training"):
        if key not in meta:
            raise IngestError(f"{path}: missing field {key!r}")
    return meta


def _msd_modality(meta: dict, path: str, channel: int) -> str:
    names = meta["modality"]
    name = names.get(str(channel)) if isinstance(names, dict) else None
    if name is None:
        raise IngestError(f"{path}: no modality for channel {channel} in {names}")
    if name.lower() == "ct":
        return "CT"
    if name.lower() in _MSD_MR_NAMES:
        return "MRI"
    raise IngestError(f"{path}: unknown modality {name!r} for channel {channel}")


def iter_msd(task_dir: str, min_mask_pixels: int = MSD_MIN_MASK_PIXELS, ct_window: tuple[float, float] = CT_WINDOW,
             channel: int = 0, target_names: dict[str, str] | None = None, max_cases: int | None = None,
             site: str | None = None) -> Iterator[SourceImage]:
    """Axial slices of an MSD task's training volumes that hold >= `min_mask_pixels` pixels of some label.

    Each slice is one SourceImage whose targets are the labels (named by dataset.json, or `target_names` keyed
    by label value) present with enough pixels. CT goes through `ct_window`; MR is percentile-normalised per
    volume, using `channel` of 4-D volumes. Organ labels are normal anatomy (App. A.1).
    """
    meta = read_msd_dataset_json(task_dir)
    json_path = os.path.join(task_dir, "dataset.json")
    modality = _msd_modality(meta, json_path, channel)
    labels = {int(k): (target_names or {}).get(str(k), v) for k, v in meta["labels"].items() if int(k) > 0}
    task = str(meta.get("name", os.path.basename(os.path.normpath(task_dir))))
    site = site or re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")
    for case in meta["training"][:max_cases]:
        image_path = os.path.normpath(os.path.join(task_dir, case["image"]))
        label_path = os.path.normpath(os.path.join(task_dir, case["label"]))
        try:
            image = nifti.read_nifti(image_path)
            label = nifti.read_nifti(label_path)
        except nifti.NiftiError as e:
            raise IngestError(str(e)) from e
        volume = image.data
        if volume.ndim == 4:
            volume = volume[..., channel]
        if volume.ndim != 3 or label.data.ndim != 3:
            raise IngestError(f"{image_path}: expected a 3-D volume (or 4-D with channels), got {image.data.shape}")
        if volume.shape != label.data.shape:
            raise IngestError(f"{label_path}: label shape {label.data.shape} differs from image {volume.shape}")
        slices = axial_slices(volume, image.affine, image_path)
        label_slices = axial_slices(np.asarray(label.data).astype(np.int64), image.affine, image_path)
        gray = window_ct(slices, *ct_window) if modality == "CT" else normalize_mr(slices)
        case_id = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(image_path))
        for index in range(slices.shape[0]):
            targets = []
            for value, name in labels.items():
                mask = label_slices[index] == value
                if mask.sum() >= min_mask_pixels:
                    target_type = classify_target(name)
                    targets.append(Target(name=name, target_type=target_type, mask=np.ascontiguousarray(mask),
                                          normal_anatomy=target_type == "organ",
                                          mask_origin=f"{label_path}[axial {index}]"))
            if targets:
                rgb = np.repeat(np.ascontiguousarray(gray[index])[..., None], 3, axis=-1)
                yield SourceImage(image_id=f"{case_id}_z{index:03d}", image=rgb, modality=modality, site=site,
                                  source=f"MSD {task}", targets=tuple(targets), origin=f"{image_path}[axial {index}]")
