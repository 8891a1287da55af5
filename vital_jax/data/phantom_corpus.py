"""Image-text pretraining data from phantoms: what a small VLM must know before it can learn VQA on them.

PhantomVQA (configs/data/phantom_vqa.py) asks questions about phantoms; a backbone trained from random weights
needs to have learned to *see* them first, as a real Qwen3-VL has on web and medical image-text data. This
module writes that earlier stage's data from phantoms of other seeds than the benchmark's (no benchmark image is
ever seen in pretraining), worded differently from the benchmark's question templates:

  report     "Report the findings of this CT scan."  -> one terse line per structure: where, how big, contrast
  grounding  "What lies in the upper left part of the image?" -> the structures whose centre is there
  lesions    "List the abnormalities in this MRI scan." -> the lesions present, or that none is seen
  structure  "Report the spleen." -> that structure's line of the report
and, for the auxiliary decoder, reasoning-chain text: the geometry teacher's steps for questions about these
phantoms (texts.jsonl).

Layout (the contract `vital_jax.pretrain` reads):
  out_dir/images/ID.png      RGB phantoms
  out_dir/pairs.jsonl        {"id", "image", "prompt", "text", "split"}   (image relative to out_dir)
  out_dir/texts.jsonl        {"id", "text", "split"}
  out_dir/tokenizer/         a byte-level BPE over all of it plus the benchmark templates' wording
  out_dir/corpus.json        the settings it was built with and counts (a rebuild with other settings is refused)

And, in memory rather than on disk, what an ROI encoder is pretrained on (`PatchLabelExamples`: phantoms and the
share of each tissue class in each patch; `vital_jax.pretrain`'s roi_encoder stage).
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from PIL import Image

from vital_jax.data import geometry, phantoms, questions, records
from vital_jax.data.geometry_teacher import GeometryTeacher
from vital_jax.data.quality_gate import parse_output
from vital_jax.jsonio import read_json

PAIRS_FILE, TEXTS_FILE, TOKENIZER_DIR, SUMMARY_FILE = "pairs.jsonl", "texts.jsonl", "tokenizer", "corpus.json"
_LESIONS = tuple(name for name, kind in phantoms.TARGET_TYPES.items() if kind == "lesion")
# What an ROI encoder is pretrained to tell apart patch by patch (`patch_labels`): class 0 is every pixel no target
# covers (air, body wall, fat); a lesion's pixels are the lesion's class, not its organ's.
PATCH_CLASSES = ("other",) + tuple(phantoms.TARGET_TYPES)


class CorpusError(ValueError):
    """The corpus cannot be built as asked (bad settings, or an existing folder built with other settings)."""


def default_config() -> ml_collections.ConfigDict:
    """Corpus settings. Seeds from 1000 up keep pretraining phantoms apart from PhantomVQA's (seeds 0-2)."""
    # chain_phantoms: how many phantoms (the first ones) also give reasoning-chain text for the decoder (-1: all);
    # the chains are much slower to make than image-text pairs and the decoder needs fewer of them.
    return ml_collections.ConfigDict(dict(seed=1000, num_phantoms=300, phantom_size=128,
                                          modalities=tuple(phantoms.PHANTOM_MODALITIES), layout="varied",
                                          val_fraction=0.1, chain_phantoms=-1))


def _size_words(area_fraction: float) -> str:
    return ("tiny" if area_fraction < 0.01 else "small" if area_fraction < 0.05 else "medium"
            if area_fraction < 0.15 else "large")


def _contrast_word(g: geometry.MaskGeometry) -> str:
    c = g.contrast
    return "isodense" if abs(c) < 8 else ("bright" if c > 0 else "dark")


def _where(g: geometry.MaskGeometry) -> str:
    """"in the upper left part", "in the left and right parts" (two kidneys), "across the upper two thirds"
    (scattered): the benchmark's own location rule (geometry.where), so a target of several regions is never
    placed at the centre of its whole mask, which may lie between its parts."""
    return geometry.where(g).removesuffix(" of the image")


def _region_cores(g: geometry.MaskGeometry) -> list[str]:
    """The image regions ("upper left", "central"...) holding the centre of one of the target's parts."""
    parts = g.parts if g.components > 1 else [g]
    return list(dict.fromkeys(geometry.region_core(p.vertical, p.horizontal) for p in parts))


def _report_line(target: str, g: geometry.MaskGeometry) -> str:
    """"liver: in the upper left part, large, dark." (terse on purpose: not the benchmark's sentences)."""
    return f"{target}: {_where(g)}, {_size_words(g.area_fraction)}, {_contrast_word(g)}."


def _pairs_for(image_rel: str, stem: str, phantom: phantoms.Phantom,
               measured: dict[str, geometry.MaskGeometry]) -> list[dict]:
    modality = questions.MODALITY_PHRASES[phantom.modality]
    lines = [_report_line(t, measured[t]) for t in phantoms.TARGET_TYPES if t in measured]
    pairs = [dict(prompt=f"Report the findings of this {modality}.", text=" ".join(lines))]
    present = [t for t in _LESIONS if t in measured]
    pairs.append(dict(prompt=f"List the abnormalities in this {modality}.",
                      text=(", ".join(present) + "." if present else "none seen.")))
    for target, g in measured.items():
        pairs.append(dict(prompt=f"Report the {target}.", text=_report_line(target, g)))
    regions: dict[str, list[str]] = {}
    for target, g in measured.items():
        for core in _region_cores(g):
            regions.setdefault(core, []).append(target)
    for core, targets in sorted(regions.items()):
        pairs.append(dict(prompt=f"What lies in the {core} part of the image?", text=", ".join(targets) + "."))
    return [dict(p, id=f"{stem}__{i}", image=image_rel) for i, p in enumerate(pairs)]


def _chain_texts(stem: str, image_rel: str, phantom: phantoms.Phantom, rgb: np.ndarray,
                 measured: dict[str, geometry.MaskGeometry], seed: int, teacher: GeometryTeacher) -> tuple[list, list]:
    """(reasoning-chain texts, question/answer texts for the tokenizer) from the geometry teacher's answers to
    every question type about every target of this phantom."""
    chains, wording = [], []
    for target, g in measured.items():
        for question_type in records.QUESTION_TYPES:
            q = questions.make_question(question_type, image_id=stem, image_path=image_rel, mask_path="",
                                        target=target, target_type=phantoms.TARGET_TYPES[target],
                                        modality=phantom.modality, source="phantom", normal_anatomy=True, geo=g,
                                        rng=questions.question_rng(seed, f"{stem}/{target}/{question_type}"))
            if q is None:  # a location choice the target's regions cannot answer
                continue
            # The teacher caches by (image, mask) path; each target gets its own key.
            q = questions.Question.from_dict(dict(q.to_dict(), mask=f"{stem}/{target}"))
            output = parse_output(teacher.generate(q, rgb, phantom.masks[target]))
            if isinstance(output, str):
                raise CorpusError(f"{stem}: the geometry teacher's output did not parse: {output}")
            chains += list(output.reasoning_chain)
            wording += [q.question, output.final_answer]
    return chains, wording


def _check_existing(out_dir: str, settings: dict) -> bool:
    path = os.path.join(out_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return False
    previous = read_json(path, CorpusError)
    if not isinstance(previous, dict):
        raise CorpusError(f"{path}: not a JSON object; delete {out_dir} to rebuild the corpus")
    if previous.get("settings") != settings:
        raise CorpusError(f"{out_dir} holds a corpus built with other settings ({previous.get('settings')}); "
                          f"use another folder or delete it")
    return True


def build_corpus(out_dir: str, config=None) -> str:
    """Write the corpus into `out_dir` (see the module docstring); returns `out_dir`.

    Reuses a finished corpus built with the same settings (corpus.json is written last); refuses one built with
    other settings. Deterministic under the settings.
    """
    from vital_jax import demo_assets

    c = default_config()
    if config is not None:  # a partial config (e.g. a pretraining recipe's `corpus`) keeps the other defaults
        c.update(dict(config))
    settings = dict(seed=int(c.seed), num_phantoms=int(c.num_phantoms), phantom_size=int(c.phantom_size),
                    modalities=list(c.modalities), layout=str(c.layout), val_fraction=float(c.val_fraction),
                    chain_phantoms=int(c.chain_phantoms))
    if settings["num_phantoms"] < 2:
        raise CorpusError(f"corpus num_phantoms={settings['num_phantoms']}: need at least 2 (train and val)")
    if not 0.0 < settings["val_fraction"] < 1.0:
        raise CorpusError(f"corpus val_fraction={settings['val_fraction']} must lie strictly between 0 and 1")
    if _check_existing(out_dir, settings):
        return out_dir
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    n_val = max(1, int(round(settings["num_phantoms"] * settings["val_fraction"])))
    teacher = GeometryTeacher()
    pairs, texts, wording = [], [], []
    for index in range(settings["num_phantoms"]):
        modality = settings["modalities"][index % len(settings["modalities"])]
        phantom = phantoms.make_phantom(modality, settings["seed"], index, settings["phantom_size"],
                                        settings["layout"])
        split = "val" if index >= settings["num_phantoms"] - n_val else "train"
        stem = phantoms.phantom_stem(index, modality, "pretrain")
        image_rel = f"images/{stem}.png"
        rgb = np.repeat(phantom.image[..., None], 3, axis=-1)
        Image.fromarray(rgb).save(os.path.join(out_dir, image_rel))
        measured = {t: geometry.measure(rgb, m) for t, m in phantom.masks.items()}
        pairs += [dict(p, split=split) for p in _pairs_for(image_rel, stem, phantom, measured)]
        if settings["chain_phantoms"] < 0 or index < settings["chain_phantoms"] or split == "val":
            chains, said = _chain_texts(stem, image_rel, phantom, rgb, measured, settings["seed"], teacher)
            texts += [dict(id=f"{stem}__chain{i}", text=t, split=split) for i, t in enumerate(dict.fromkeys(chains))]
            wording += said
    records.write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), pairs)
    records.write_jsonl_atomic(os.path.join(out_dir, TEXTS_FILE), texts)
    corpus = [p["prompt"] for p in pairs] + [p["text"] for p in pairs] + [t["text"] for t in texts] + wording
    demo_assets.write_tokenizer(os.path.join(out_dir, TOKENIZER_DIR), corpus)
    summary = dict(settings=settings, pairs=len(pairs), texts=len(texts),
                   splits={s: sum(p["split"] == s for p in pairs) for s in ("train", "val")})
    with open(os.path.join(out_dir, SUMMARY_FILE) + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out_dir, SUMMARY_FILE) + ".tmp", os.path.join(out_dir, SUMMARY_FILE))
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Patch labels: what an ROI encoder is pretrained on
# ---------------------------------------------------------------------------------------------------------------


def _class_map(phantom: phantoms.Phantom) -> np.ndarray:
    """(H, W, len(PATCH_CLASSES)) float32 one-hot: each pixel's class."""
    labels = np.zeros(phantom.image.shape, np.int32)
    for name in phantoms.TARGET_TYPES:  # organs before lesions: a lesion's pixels end as the lesion's
        if name in phantom.masks:
            labels[phantom.masks[name]] = PATCH_CLASSES.index(name)
    return (labels[..., None] == np.arange(len(PATCH_CLASSES))).astype(np.float32)


def _shares(one_hot: np.ndarray, grid: int) -> np.ndarray:
    from vital_jax.data.roi import area_downsample

    shares = [area_downsample(one_hot[..., c], grid) for c in range(one_hot.shape[-1])]
    return np.stack(shares, axis=-1).reshape(grid * grid, one_hot.shape[-1])


def patch_labels(phantom: phantoms.Phantom, grid: int) -> np.ndarray:
    """(grid * grid, len(PATCH_CLASSES)) float32, raster order: the share of each class in each cell of a
    grid x grid partition of the phantom (`roi.area_downsample`'s cells, those of the patch grid of an encoder
    that resizes the whole image to its input size). Rows sum to 1."""
    return _shares(_class_map(phantom), grid)


def encoder_views(phantom: phantoms.Phantom, grid: int, padding: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """What an ROI encoder encodes of this phantom (`roi.prepare_view`'s two pathways), each with its patch
    labels: [(name, rgb (h, w, 3) uint8, shares (grid * grid, C))]: the whole image ("full"), then for each target
    the tight crop of its mask's box widened by `padding` on a zero square canvas (named after the target; the
    canvas padding is "other", as black as air)."""
    from vital_jax.data.roi import crop_canvas, expand_box, mask_box

    rgb = np.repeat(phantom.image[..., None], 3, axis=-1)
    one_hot = _class_map(phantom)
    views = [("full", rgb, _shares(one_hot, grid))]
    for name in phantoms.TARGET_TYPES:
        if name not in phantom.masks:
            continue
        box = expand_box(mask_box(phantom.masks[name]), padding, *rgb.shape[:2])
        canvas, _ = crop_canvas(rgb, box)
        labels, content = crop_canvas(one_hot, box)
        labels[..., 0] += 1.0 - content
        views.append((name, canvas, _shares(labels, grid)))
    return views


class PatchLabelExamples:
    """The encoder views (`encoder_views`) of one split's phantoms, rendered once into memory, for pretraining an
    ROI encoder: batch(indices, valid) -> pixels (B, S, S, 3) float32 (the encoder's `preprocessor`, a
    `SiglipPreprocessor`), targets (B, grid * grid, len(PATCH_CLASSES)) float32, record_index (B,) int32,
    example_valid (B,) bool.

    settings: seed, phantoms (how many; the last val_fraction of them are "val"), phantom_size, modalities
    (cycled), layout, padding (the crops' margin, `roi.RoiConfig.padding`). A seed apart from PhantomVQA's (0-2)
    and the corpus's (1000 up) keeps every benchmark and corpus image out of it. The interface is
    `pretrain_corpus.Examples`' (len, ids, batch) without a tokenizer."""

    def __init__(self, settings, split: str, grid: int, preprocessor):
        count = int(settings.phantoms)
        n_val = max(1, int(round(count * float(settings.val_fraction))))
        if count - n_val < 1:
            raise CorpusError(f"roi_encoder phantoms={count}: need at least 2 (train and val)")
        if split not in ("train", "val"):
            raise CorpusError(f"split {split!r}: the ROI encoder's phantoms have 'train' and 'val'")
        indices = range(count - n_val) if split == "train" else range(count - n_val, count)
        self.preprocessor = preprocessor
        modalities = tuple(settings.modalities)
        self.records, resized, targets = [], [], []
        for index in indices:
            modality = modalities[index % len(modalities)]
            phantom = phantoms.make_phantom(modality, int(settings.seed), index, int(settings.phantom_size),
                                            str(settings.layout))
            stem = phantoms.phantom_stem(index, modality, "encoder")
            for name, rgb, shares in encoder_views(phantom, grid, float(settings.padding)):
                self.records.append({"id": f"{stem}/{name}"})
                resized.append(preprocessor.resize(Image.fromarray(rgb)))  # uint8: a quarter of float32's memory
                targets.append(shares)
        self.resized = np.stack(resized)
        self.targets = np.stack(targets)

    def __len__(self) -> int:
        return len(self.records)

    def ids(self, index) -> list[str]:
        return [self.records[int(i)]["id"] for i in np.atleast_1d(index)]

    def batch(self, indices, valid) -> dict[str, np.ndarray]:
        rows = np.asarray(indices, np.int64)
        return dict(pixels=self.preprocessor.normalize(self.resized[rows]), targets=self.targets[rows], record_index=rows.astype(np.int32),
                    example_valid=np.asarray(valid, bool))

    def class_shares(self) -> np.ndarray:
        """(len(PATCH_CLASSES),) the mean share of each class over every patch of every view of this split."""
        return self.targets.mean(axis=(0, 1))
