"""Ingestion: segmentation datasets -> images with named target masks (App. A.1, "From segmentation to QA tuples").

Three sources, one output type (`SourceImage`: an RGB image and its `Target`s, each a binary mask with a target
name, target type and whether it is normal anatomy):
  BiomedParse layout  `NAME_MODALITY_SITE.png` images and `NAME_MODALITY_SITE_TARGET.png` masks ('+' = space,
                      0/255) in two folders; modality and site are parsed from the name. Phantoms use it too.
  MSD                 a task folder with `dataset.json` and NIfTI-1/-2 volumes; axial slices whose target mask
                      has at least `min_mask_pixels` (100) pixels, CT windowing, label names from dataset.json;
                      an organ's mask includes the lesion labels painted inside it (`organ_mask`).
  DICOM               `images/CASE/` DICOM series with `labels/CASE.nii.gz` label volumes; slices as for MSD,
                      windowed by the series' WindowCenter/WindowWidth or a per-modality default.
Volumes are sliced in RAS+ order, shown radiologically (vital_jax.data.volumes): image top = anterior, image
left = the patient's right. Every error names the file it is about.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Iterator

import numpy as np
from absl import logging
from scipy import ndimage

from vital_jax.data import dicom, images, volumes
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
    """An image (uint8 (H, W, 3) RGB) with its targets; `origin` is the file it came from (for messages).

    `group` is the volume (MSD / DICOM case) a slice was cut from: neighbouring slices of one patient are nearly
    the same image, so splits keep a group whole (questions.assign_splits). Empty: the image is its own group (the
    BiomedParse layout, whose NAME carries no volume id).
    """

    image_id: str
    image: np.ndarray
    modality: str
    site: str
    source: str
    targets: tuple[Target, ...]
    origin: str
    group: str = ""


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
    """uint8 (H, W, 3) by the rules every stage shares (vital_jax.data.images: size limits, modes, the window of
    16-bit images); an IngestError naming the file otherwise."""
    try:
        return images.load_image(path)
    except images.ImageError as e:
        raise IngestError(str(e)) from e


def load_mask(path: str, image_shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W) from a 0/255 (or 0/1) mask file (vital_jax.data.images.load_mask); an IngestError naming the
    file for other values, a size mismatch or an empty mask."""
    try:
        return images.load_mask(path, image_shape)
    except images.ImageError as e:
        raise IngestError(str(e)) from e


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
    stems: dict[str, str] = {}
    for name in sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES)):
        stem = os.path.splitext(name)[0]
        if stem in stems:  # both would become images/STEM.png and share their questions' ids
            raise IngestError(f"{os.path.join(image_dir, stems[stem])} and {os.path.join(image_dir, name)}: two "
                              f"images named {stem!r}; keep one")
        stems[stem] = name
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


def read_msd_dataset_json(task_dir: str) -> dict:
    """The task's dataset.json, checked for the fields ingestion needs and their types; an IngestError naming the
    file and the field otherwise."""
    path = os.path.join(task_dir, "dataset.json")
    meta = read_json(path, IngestError, "an MSD task folder holds dataset.json")
    if not isinstance(meta, dict):
        raise IngestError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("labels", "modality", "training"):
        if key not in meta:
            raise IngestError(f"{path}: missing field {key!r}")
    label_names(meta["labels"], f"{path}: field 'labels'")
    modality = meta["modality"]
    if not isinstance(modality, dict) or not all(isinstance(v, str) for v in modality.values()):
        raise IngestError(f"{path}: field 'modality' must map channels to modality names, e.g. {{\"0\": \"CT\"}}; "
                          f"got {modality!r}")
    training = meta["training"]
    if not isinstance(training, list):
        raise IngestError(f"{path}: field 'training' must be a list of {{\"image\": ..., \"label\": ...}} objects, "
                          f"got {type(training).__name__}")
    for i, case in enumerate(training):
        if not isinstance(case, dict):
            raise IngestError(f"{path}: field 'training' entry {i} must be an object, got {type(case).__name__}")
        for key in ("image", "label"):
            if not isinstance(case.get(key), str) or not case[key].strip():
                raise IngestError(f"{path}: field 'training' entry {i} needs {key!r}, a path relative to the task "
                                  f"folder; got {case.get(key)!r}")
    return meta


def label_names(labels, where: str) -> dict[int, str]:
    """{label value: target name} of a mapping from label values ("1" or 1) to target names, without the
    background (0); an IngestError naming `where` (a file and field, or an argument) for anything else."""
    example = "label value -> target name, e.g. {'1': 'liver'}"
    if not isinstance(labels, dict):
        raise IngestError(f"{where}: expected a mapping {example}; got {type(labels).__name__} {labels!r}")
    out = {}
    for key, name in labels.items():
        value = None
        if isinstance(key, int) and not isinstance(key, bool):
            value = key
        elif isinstance(key, str) and re.fullmatch(r"\d+", key.strip()):
            value = int(key)
        if value is None:
            raise IngestError(f"{where}: key {key!r} is not a label value (a non-negative integer); expected a "
                              f"mapping {example}")
        if not isinstance(name, str) or not name.strip():
            raise IngestError(f"{where}: the target name of label {key!r} must be a non-empty string, got {name!r}")
        if value > 0:
            out[value] = name
    return out


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


# A lesion component lies within an organ when at least this share of the pixels just around it are that organ's.
NESTED_LESION_SURROUND = 0.5


def organ_mask(label_slice: np.ndarray, organ_value: int, lesion_values: Iterable[int]) -> np.ndarray:
    """bool (H, W): the pixels of `organ_value` in the int label slice, plus every connected region of a lesion
    label that lies within the organ (at least NESTED_LESION_SURROUND of its 8-neighbour ring is organ).

    Label maps hold one value per voxel, so MSD paints a lesion over the organ it grows in (Task03_Liver: 1 liver,
    2 cancer; Task07_Pancreas: 1 pancreas, 2 cancer): the organ label alone is the organ with a hole where its
    tumour is. A lesion lying elsewhere (beside the organ, or in another organ) is not added.
    """
    organ = label_slice == organ_value
    mask = organ.copy()
    for value in lesion_values:
        regions, count = ndimage.label(label_slice == value, structure=np.ones((3, 3), bool))
        for region in range(1, count + 1):
            inside = regions == region
            ring = ndimage.binary_dilation(inside, structure=np.ones((3, 3), bool)) & ~inside
            if ring.any() and organ[ring].mean() >= NESTED_LESION_SURROUND:
                mask |= inside
    return mask


def _slice_images(gray: np.ndarray, label_slices: np.ndarray, labels: dict[int, str], min_mask_pixels: int,
                  case_id: str, image_origin: str, label_origin: str, modality: str, site: str,
                  source: str) -> Iterator[SourceImage]:
    """One SourceImage per axial slice (uint8 `gray` (Z, H, W), int `label_slices` alike) holding some label with
    >= `min_mask_pixels` pixels, all of group `case_id`; organ labels are normal anatomy (App. A.1), and an organ's
    mask holds the lesions painted over it (`organ_mask`)."""
    lesion_values = [value for value, name in labels.items() if classify_target(name) == "lesion"]
    for index in range(gray.shape[0]):
        targets = []
        for value, name in labels.items():
            if classify_target(name) == "organ":
                mask = organ_mask(label_slices[index], value, lesion_values)
            else:
                mask = label_slices[index] == value
            if mask.sum() >= min_mask_pixels:
                target_type = classify_target(name)
                targets.append(Target(name=name, target_type=target_type, mask=np.ascontiguousarray(mask),
                                      normal_anatomy=target_type == "organ",
                                      mask_origin=f"{label_origin}[axial {index}]"))
        if targets:
            rgb = np.repeat(gray[index][..., None], 3, axis=-1)
            yield SourceImage(image_id=f"{case_id}_z{index:03d}", image=rgb, modality=modality, site=site,
                              source=source, targets=tuple(targets), origin=f"{image_origin}[axial {index}]",
                              group=case_id)


def _load_label(path: str, image: volumes.Volume, translation: bool = True) -> np.ndarray:
    """The label volume at `path` in RAS+ order, checked to lie on `image`'s grid."""
    try:
        label = volumes.load_nifti(path, labels=True)
        volumes.check_same_grid(image, label, translation=translation)
    except volumes.VolumeError as e:
        raise IngestError(str(e)) from e
    return label.data


def iter_msd(task_dir: str, min_mask_pixels: int = MSD_MIN_MASK_PIXELS, ct_window: tuple[float, float] = CT_WINDOW,
             channel: int = 0, target_names: dict[str, str] | None = None, max_cases: int | None = None,
             site: str | None = None) -> Iterator[SourceImage]:
    """Axial slices of an MSD task's training volumes that hold >= `min_mask_pixels` pixels of some label.

    Volumes and labels are read with nibabel and brought to RAS+ (vital_jax.data.volumes: radiological display,
    image left = patient's right); each label volume must lie on its image's grid. Each slice is one SourceImage
    whose targets are the labels present with enough pixels, named by dataset.json or renamed by `target_names`
    (dataset.json label name -> target name, e.g. {"Anterior": "anterior hippocampus"}: the questions name the
    target, and the name decides its target type, so a renamed organ label becomes normal anatomy). CT goes
    through `ct_window`; MR is percentile-normalised per volume, using `channel` of 4-D volumes. Organ labels are
    normal anatomy (App. A.1).
    """
    meta = read_msd_dataset_json(task_dir)
    json_path = os.path.join(task_dir, "dataset.json")
    modality = _msd_modality(meta, json_path, channel)
    labels = label_names(meta["labels"], f"{json_path}: field 'labels'")
    renames = dict(target_names or {})
    unknown = sorted(set(renames) - set(labels.values()))
    if unknown:
        raise IngestError(f"{json_path}: target_names renames labels {unknown} that field 'labels' does not name "
                          f"(its label names: {sorted(labels.values())})")
    labels = {value: renames.get(name, name) for value, name in labels.items()}
    task = str(meta.get("name", os.path.basename(os.path.normpath(task_dir))))
    site = site or _slug(task)
    for case in meta["training"][:max_cases]:
        image_path = os.path.normpath(os.path.join(task_dir, case["image"]))
        label_path = os.path.normpath(os.path.join(task_dir, case["label"]))
        try:
            image = volumes.load_nifti(image_path)
        except volumes.VolumeError as e:
            raise IngestError(str(e)) from e
        label = _load_label(label_path, image)
        volume = image.data
        if volume.ndim == 4:
            if not 0 <= channel < volume.shape[3]:
                raise IngestError(f"{image_path}: no channel {channel} in a volume of shape {volume.shape}")
            volume = volume[..., channel]
        slices = volumes.axial_slices(volume)
        gray = volumes.window(slices, *ct_window) if modality == "CT" else volumes.normalize_percentiles(slices)
        case_id = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(image_path))
        yield from _slice_images(gray, volumes.axial_slices(label), labels, min_mask_pixels, case_id, image_path,
                                 label_path, modality, site, f"MSD {task}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _dicom_gray(series: dicom.DicomSeries, window: tuple[float, float] | None) -> np.ndarray:
    """uint8 (Z, H, W) slices: `window` if given, else the series' own window, else CT_WINDOW for CT and the
    percentile normalisation for other modalities; MONOCHROME1 series are inverted after windowing."""
    slices = volumes.axial_slices(series.volume.data)
    window = window or series.window or (CT_WINDOW if series.modality == "CT" else None)
    gray = volumes.window(slices, *window) if window else volumes.normalize_percentiles(slices)
    return 255 - gray if series.inverted else gray


def dicom_cases(root: str) -> list[tuple[str, str, str]]:
    """(case id, DICOM folder, label file) of a DICOM source folder, sorted: `root/images/CASE/` (one series,
    files at any depth) with `root/labels/CASE.nii.gz` (or .nii). A case without its label, or a label without
    its case, is an error naming the file."""
    image_root, label_root = os.path.join(root, "images"), os.path.join(root, "labels")
    for folder in (image_root, label_root):
        if not os.path.isdir(folder):
            raise IngestError(f"{folder}: folder not found (a DICOM source holds images/CASE/ and "
                              "labels/CASE.nii.gz)")
    cases = sorted(n for n in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, n))
                   and not n.startswith("."))
    label_files = {re.sub(r"\.nii(\.gz)?$", "", n): n for n in sorted(os.listdir(label_root))
                   if re.search(r"\.nii(\.gz)?$", n)}
    for case, name in label_files.items():
        if case not in cases:
            raise IngestError(f"{os.path.join(label_root, name)}: no DICOM folder {os.path.join(image_root, case)} "
                              "for this label")
    out = []
    for case in cases:
        if case not in label_files:
            raise IngestError(f"{os.path.join(image_root, case)}: missing mask {os.path.join(label_root, case)}"
                              ".nii.gz")
        out.append((case, os.path.join(image_root, case), os.path.join(label_root, label_files[case])))
    return out


def iter_dicom(root: str, labels: dict[str, str], min_mask_pixels: int = MSD_MIN_MASK_PIXELS,
               window: tuple[float, float] | None = None, max_cases: int | None = None, name: str = "",
               site: str | None = None) -> Iterator[SourceImage]:
    """Axial slices of DICOM series with NIfTI label volumes (layout: `dicom_cases`), as `iter_msd` makes them.

    Each series (vital_jax.data.dicom: rescaled, RAS+) must lie on the grid of its label volume after both are
    in RAS+ order. `labels` maps label values ("1") to target names; values not listed are ignored. Modality is
    the series' Modality tag (CT, MR, ...); the window is `window`, else the series' WindowCenter/WindowWidth,
    else soft tissue (CT_WINDOW) for CT or the percentile normalisation for other modalities.
    """
    names = label_names(labels, f"{root}: label names {labels!r}")
    if not names:
        raise IngestError(f"{root}: no label names given (a mapping such as {{'1': 'liver'}})")
    name = name or os.path.basename(os.path.normpath(root))
    site = site or _slug(name)
    for case_id, folder, label_path in dicom_cases(root)[:max_cases]:
        try:
            series = dicom.read_series(folder)
        except volumes.VolumeError as e:
            raise IngestError(str(e)) from e
        modality = parse_modality(series.modality, series.files[0])
        label = _load_label(label_path, series.volume, translation=series.positioned)
        yield from _slice_images(_dicom_gray(series, window), volumes.axial_slices(label), names,
                                 min_mask_pixels, case_id, folder, label_path, modality, site, f"DICOM {name}")
