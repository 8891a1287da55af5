"""Build a VITAL dataset directory: images + masks -> questions -> teacher -> records.jsonl (-> ROI features).

    python -m vital_jax.data.build --config=configs/data/demo_phantoms.py [--config.out_dir=DIR ...]

Stages (each resumable; rerunning the command finishes what is missing):
  0 inputs    the build's inputs (the config fields that shape the outputs, and the source files' sizes and
              hashes; vital_jax.data.build_inputs) are recorded in `out_dir/build_inputs.json`. A rerun with the
              same inputs resumes; with other inputs it is refused, naming what changed, unless
              `config.on_change = "rebuild"`, which first moves the old outputs (and their build_inputs.json) into
              `out_dir/replaced-<UTC time>/`, or stage 1 never finished. Every config value is checked before this
              stage, so a mistake stops the build before anything is written.
  1 prepare   ingest the source (`config.source`: "phantoms", "biomedparse", "msd" or "dicom"), write
              `images/ID.png` (RGB) and `masks/ID_TARGET.png` (0/255) into `out_dir`, make one question per target
              and question type, assign grouped stratified splits, write `questions.jsonl`. Skipped when it exists.
              Images pass the checks every stage applies (vital_jax.data.images); question ids are unique (target
              names of one image that normalise alike are told apart), and a duplicate id stops the build,
              naming both sources; an empty split is warned about.
  2 teacher   `config.teacher.kind`: "geometry" (offline) or "api" (OpenAI-compatible); gated, appended to
              `records.jsonl` with roi_index = -1; finished ids are skipped on a rerun.
  3 roi       only if `config.roi.enabled`: `vital_jax.data.roi.extract_dataset_rois(out_dir, encoder_dir, ...)`
              fills the ROI arrays and each record's roi_index.
  4 validate  `records.validate_dataset(out_dir)`; any problem fails the build.
The config is an ml_collections ConfigDict (`get_config()`); vital_jax.data.build_config lists every field.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import urllib.parse
from typing import Iterator

import numpy as np
from absl import app, logging
from ml_collections import config_flags
from PIL import Image

from vital_jax import cli
from vital_jax.data import balance, build_inputs, geometry, images, ingest, phantoms, questions, records, teacher
from vital_jax.data.build_config import default_config
from vital_jax.data.records import QUESTION_TYPES
from vital_jax.workdir import WorkdirInUseError, WorkdirLock

# Defined only when run as a program, so that importing `build` (the demo, tests) defines no absl flags.
_CONFIG = None


class BuildError(RuntimeError):
    """The build cannot go on; the message says which stage and why."""


def phantom_split_plan(config) -> list[tuple[str | None, int, int]]:
    """(split or None, phantom count, seed) per phantom draw: one draw split afterwards by `split_fractions`, or,
    with `phantoms.split_counts`, one draw per split from its own seed (disjoint phantoms by construction)."""
    p = config.phantoms
    if not p.split_counts:
        return [(None, p.count, config.seed)]
    if len(p.split_counts) != len(records.SPLITS) or min(p.split_counts) < 0:
        raise BuildError(f"config.phantoms.split_counts={tuple(p.split_counts)}: expected {len(records.SPLITS)} "
                         f"non-negative counts ({', '.join(records.SPLITS)})")
    seeds = tuple(p.split_seeds) or tuple(config.seed + j for j in range(len(records.SPLITS)))
    if len(seeds) != len(records.SPLITS) or len(set(seeds)) != len(seeds):
        raise BuildError(f"config.phantoms.split_seeds={tuple(p.split_seeds)}: expected {len(records.SPLITS)} "
                         "distinct seeds")
    return [(split, count, seed) for split, count, seed in zip(records.SPLITS, p.split_counts, seeds) if count]


def check_config(config) -> None:
    """Every config value, checked before anything is written: a mistake that a later stage found only after
    stage 1 had written images would leave a folder that the corrected rerun refuses as built from other inputs.
    Raises BuildError naming the field (IngestError for dicom.labels)."""
    if not config.out_dir:
        raise BuildError("config.out_dir is empty: say where the dataset goes")
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise BuildError(f"config.out_dir={config.out_dir!r} is a file, not a folder: name a folder (it is created "
                         "if missing)")
    if config.on_change not in ("refuse", "rebuild"):
        raise BuildError(f"config.on_change={config.on_change!r}: expected 'refuse' or 'rebuild'")
    if config.source not in build_inputs.SOURCES:
        raise BuildError(f"config.source={config.source!r}: expected {', '.join(build_inputs.SOURCES)}")
    unknown = sorted(set(config.question_types) - set(QUESTION_TYPES))
    if unknown or not config.question_types:
        raise BuildError(f"config.question_types: {f'unknown {unknown}' if unknown else 'empty'} (expected some of "
                         f"{', '.join(QUESTION_TYPES)})")
    fractions = tuple(config.split_fractions)
    if (len(fractions) != len(records.SPLITS) or not all(isinstance(f, (int, float)) for f in fractions)
            or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0)):
        raise BuildError(f"config.split_fractions={fractions}: expected {len(records.SPLITS)} non-negative fractions "
                         f"({', '.join(records.SPLITS)}) summing to 1")
    _check_source_config(config)
    _teacher(config)
    t = config.teacher
    if t.workers < 1 or t.max_regenerations < 0:
        raise BuildError(f"config.teacher: workers={t.workers} must be >= 1 and max_regenerations="
                         f"{t.max_regenerations} >= 0")
    if config.roi.enabled:
        _check_roi_config(config)


def _check_source_config(config) -> None:
    """The settings of `config.source` that `_source_images` reads."""
    if config.source == "phantoms":
        p = config.phantoms
        phantom_split_plan(config)
        if not p.split_counts and p.count < 1:
            raise BuildError(f"config.phantoms.count={p.count}: expected at least 1 phantom")
        if p.layout not in phantoms.LAYOUTS:
            raise BuildError(f"config.phantoms.layout={p.layout!r}: expected one of {', '.join(phantoms.LAYOUTS)}")
        unknown = sorted(set(p.modalities) - set(phantoms.PHANTOM_MODALITIES))
        if unknown or not p.modalities:
            raise BuildError(f"config.phantoms.modalities: {f'unknown {unknown}' if unknown else 'empty'} (expected "
                             f"some of {', '.join(phantoms.PHANTOM_MODALITIES)})")
        if p.size < phantoms.MIN_SIZE:
            raise BuildError(f"config.phantoms.size={p.size}: expected at least {phantoms.MIN_SIZE} pixels")
    elif config.source == "biomedparse":
        if not config.biomedparse.image_dir or not config.biomedparse.mask_dir:
            raise BuildError("config.source='biomedparse' needs biomedparse.image_dir and biomedparse.mask_dir")
    elif config.source == "msd":
        m = config.msd
        if not m.task_dir:
            raise BuildError("config.source='msd' needs msd.task_dir (a folder holding dataset.json)")
        if len(m.ct_window) != 2 or m.ct_window[1] <= 0:
            raise BuildError(f"config.msd.ct_window={tuple(m.ct_window)}: expected (level, width) with width > 0")
        if m.channel < 0:
            raise BuildError(f"config.msd.channel={m.channel}: expected a channel index >= 0")
        names = dict(m.target_names)
        if not all(isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in names.items()):
            raise BuildError(f"config.msd.target_names={names!r}: expected a mapping of dataset.json label names to "
                             "non-empty target names, e.g. {'Anterior': 'anterior hippocampus'}")
        if names:  # a misspelt label name would otherwise rename nothing, silently
            json_path = os.path.join(m.task_dir, "dataset.json")
            known = ingest.label_names(ingest.read_msd_dataset_json(m.task_dir)["labels"], json_path).values()
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise BuildError(f"config.msd.target_names renames {unknown}, which {json_path} does not name "
                                 f"(its label names: {sorted(known)})")
    elif config.source == "dicom":
        d = config.dicom
        if not d.root or not d.labels:
            raise BuildError("config.source='dicom' needs dicom.root (images/CASE/ and labels/CASE.nii.gz) and "
                             "dicom.labels (label value -> target name, e.g. {'1': 'liver'})")
        ingest.label_names(dict(d.labels), "config.dicom.labels")
        if d.window and (len(d.window) != 2 or d.window[1] <= 0):
            raise BuildError(f"config.dicom.window={tuple(d.window)}: expected () or (level, width) with width > 0")


def _source_images(config, scratch: str, split_of: dict[str, str]) -> Iterator[ingest.SourceImage]:
    """The source's images; for phantoms drawn per split, `split_of` is filled with image path -> split."""
    if config.source == "phantoms":
        return _phantom_images(config, scratch, split_of)
    if config.source == "biomedparse":
        b = config.biomedparse
        return ingest.iter_biomedparse(b.image_dir, b.mask_dir, source=b.source, normal_anatomy=b.normal_anatomy)
    if config.source == "msd":
        m = config.msd
        return ingest.iter_msd(m.task_dir, min_mask_pixels=m.min_mask_pixels, ct_window=tuple(m.ct_window),
                               channel=m.channel, target_names=dict(m.target_names), max_cases=m.max_cases or None)
    if config.source == "dicom":
        d = config.dicom
        return ingest.iter_dicom(d.root, dict(d.labels), min_mask_pixels=d.min_mask_pixels,
                                 window=tuple(d.window) or None, max_cases=d.max_cases or None, name=d.name)
    raise BuildError(f"config.source={config.source!r}: expected phantoms, biomedparse, msd or dicom")


def _phantom_images(config, scratch: str, split_of: dict[str, str]) -> Iterator[ingest.SourceImage]:
    p = config.phantoms
    for split, count, seed in phantom_split_plan(config):
        name = "phantom" if split is None else f"{split}phantom"
        image_dir, mask_dir = phantoms.write_phantom_folder(os.path.join(scratch, name), count, seed=seed,
                                                            size=p.size, modalities=tuple(p.modalities),
                                                            layout=p.layout, name=name)
        for image in ingest.iter_biomedparse(image_dir, mask_dir, source="phantom", normal_anatomy=p.normal_anatomy):
            if split is not None:
                split_of[f"images/{image.image_id}.png"] = split
            yield image


def _absence_questions(source: ingest.SourceImage, image_rel: str) -> list[questions.Question]:
    """Presence questions about the lesion types this phantom lacks (their organ's mask is the ROI)."""
    present = {t.name for t in source.targets}
    absent = [(lesion, organ) for lesion, organ in phantoms.LESION_ORGANS.items()
              if lesion not in present and organ in present]
    keys = questions.target_keys(lesion for lesion, _ in absent)
    return [questions.absence_question(image_id=source.image_id, image_path=image_rel,
                                       organ_mask_path=f"masks/{source.image_id}_{organ.replace(' ', '+')}.png",
                                       target=lesion, organ=organ, modality=source.modality, source=source.source,
                                       target_key=keys[lesion])
            for lesion, organ in absent]


def _check_source_image(source: ingest.SourceImage) -> None:
    """The size limits of vital_jax.data.images, for images made from arrays (volume slices) as for files."""
    try:
        images.check_size(source.image.shape[0], source.image.shape[1], source.origin)
    except images.ImageError as e:
        raise ingest.IngestError(str(e)) from e


def _check_unique(asked: list[questions.Question], origins: list[str]) -> None:
    """BuildError naming both sources of the first question id that two questions share."""
    first: dict[str, int] = {}
    for i, q in enumerate(asked):
        j = first.setdefault(q.id, i)
        if j != i:
            raise BuildError(f"question id {q.id!r} is made twice: from {origins[j]} and from {origins[i]}; "
                             "rename one of the two")


def prepare(config) -> list[questions.Question]:
    """Stage 1: write images, masks and questions.jsonl into `config.out_dir` (or read questions.jsonl back)."""
    out_dir = config.out_dir
    path = os.path.join(out_dir, questions.QUESTIONS_FILE)
    if os.path.exists(path):
        logging.info("%s exists: reusing its questions", path)
        return questions.read_questions(path)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    asked: list[questions.Question] = []
    origins: list[str] = []  # where each question came from, for the duplicate check
    # What each question asks of its image, whatever its wording: two targets' questions with one key have two
    # gold answers to one question (`_drop_ambiguous`).
    asks: list[tuple] = []
    split_of: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vital_build_") as scratch:
        for source in _source_images(config, scratch, split_of):
            _check_source_image(source)
            image_rel = f"images/{source.image_id}.png"  # (the key of `split_of`)
            Image.fromarray(source.image).save(os.path.join(out_dir, image_rel))
            keys = questions.target_keys(t.name for t in source.targets)
            mask_of: dict[str, ingest.Target] = {}
            for target in source.targets:
                mask_rel = f"masks/{source.image_id}_{target.name.replace(' ', '+')}.png"
                other = mask_of.setdefault(mask_rel, target)
                if other.name != target.name:  # "a b" and "a+b": one file would overwrite the other
                    raise BuildError(f"{source.origin}: targets {other.name!r} ({other.mask_origin}) and "
                                     f"{target.name!r} ({target.mask_origin}) would both be saved as {mask_rel}; "
                                     "rename one of the two")
                Image.fromarray(target.mask.astype(np.uint8) * 255).save(os.path.join(out_dir, mask_rel))
                geo = geometry.measure(source.image, target.mask)
                for question_type in config.question_types:
                    key = f"{source.image_id}/{target.name}/{question_type}"
                    question = questions.make_question(
                        question_type, image_id=source.image_id, image_path=image_rel, mask_path=mask_rel,
                        target=target.name, target_type=target.target_type, modality=source.modality,
                        source=source.source, normal_anatomy=target.normal_anatomy, geo=geo,
                        rng=questions.question_rng(config.seed, key), contrast_questions=config.contrast_questions,
                        target_key=keys[target.name], group=source.group)
                    if question is not None:  # None: the mask cannot answer this type (see make_question)
                        asked.append(question)
                        origins.append(f"{source.origin} (target {target.name!r}, mask {target.mask_origin})")
                        # An identify question names only the kind of target and where it lies (two templates).
                        asks.append((image_rel, "identify", questions.KIND_WORDS[target.target_type],
                                     geometry.where(geo)) if question_type == "identify"
                                    else (image_rel, question.question))
            if (config.source == "phantoms" and config.phantoms.absent_lesion_questions
                    and "yes_no" in config.question_types):
                absent = _absence_questions(source, image_rel)
                asked += absent
                origins += [f"{source.origin} (absent lesion {q.target!r})" for q in absent]
                asks += [(image_rel, q.question) for q in absent]
    if not asked:
        raise BuildError(f"config.source={config.source!r}: no image with a target mask was found")
    asked, origins = _drop_ambiguous(asked, origins, asks)
    _check_unique(asked, origins)
    if split_of:  # phantoms drawn per split: each image keeps the split it was drawn for
        asked = [dataclasses.replace(q, split=split_of[q.image]) for q in asked]
    else:
        asked = questions.assign_splits(asked, tuple(config.split_fractions), seed=config.seed)
    _warn_empty_splits(asked)
    questions.write_questions(path, asked)  # last: its presence marks stage 1 as done
    return asked


def _drop_ambiguous(asked: list[questions.Question], origins: list[str], asks: list[tuple]
                    ) -> tuple[list[questions.Question], list[str]]:
    """`asked` (and their origins) less every question that another target of the same image also answers: the
    same `asks` key ("What organ is shown in the central part of this CT scan?" / "Which organ can be seen in the
    central part ...?" for each of several organs there). One input with several gold answers would train each
    target's answer against the others', and a multiple-choice evaluation would count the other targets'
    correct answers as distractors."""
    targets = collections.defaultdict(set)
    for q, key in zip(asked, asks):
        targets[key].add(q.target)
    keep = [i for i, key in enumerate(asks) if len(targets[key]) == 1]
    if len(keep) < len(asked):
        example = next(q.question for q, key in zip(asked, asks) if len(targets[key]) > 1)
        logging.warning("left out %d question(s) that other targets of their image answer too (e.g. %r)",
                        len(asked) - len(keep), example)
    return [asked[i] for i in keep], [origins[i] for i in keep]


def _warn_empty_splits(asked: list[questions.Question]) -> None:
    per_split = collections.defaultdict(set)
    for q in asked:
        per_split[q.split].add(records.split_group(q))
    count = len(set().union(*per_split.values()))
    for split in records.SPLITS:
        if not per_split[split]:
            logging.warning("split %r is empty (%d volume(s) or image(s) in all, split as %s); training or evaluating "
                            "on it will fail", split, count,
                            ", ".join(f"{s} {len(per_split[s])}" for s in records.SPLITS))


def _teacher(config) -> teacher.Teacher:
    t = config.teacher
    if t.kind == "api":
        if not t.base_url or not t.model:
            raise BuildError("config.teacher.kind='api' needs teacher.base_url and teacher.model")
        parts = urllib.parse.urlsplit(t.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            # The client appends /chat/completions: a query (?key=...) would end up before it.
            raise BuildError(f"config.teacher.base_url={teacher.redact_url(t.base_url)}: expected the API's base "
                             "URL, http(s)://host/path without a query or fragment (e.g. https://api.openai.com/v1); "
                             "the key goes in the environment variable teacher.api_key_env names")
        if t.max_tokens < 0 or t.max_requests < 0:
            raise BuildError(f"config.teacher.max_tokens={t.max_tokens} and max_requests={t.max_requests} must be "
                             ">= 0 (0: the endpoint's default / no limit)")
        return teacher.make_teacher("api", teacher.ApiConfig(
            base_url=t.base_url, model=t.model, api_key_env=t.api_key_env, timeout_s=t.timeout_s,
            max_retries=t.max_retries, backoff_s=t.backoff_s, temperature=t.temperature,
            max_tokens=t.max_tokens or None, max_requests=t.max_requests))
    if t.kind == "geometry":
        return teacher.make_teacher("geometry")
    raise BuildError(f"config.teacher.kind={t.kind!r}: expected 'geometry' or 'api'")


def _sort_records(out_dir: str, asked: list[questions.Question]) -> None:
    """Rewrite records.jsonl in question order (threads finish out of order), atomically."""
    path = os.path.join(out_dir, records.RECORDS_FILE)
    order = {q.id: i for i, q in enumerate(asked)}
    rows = records.read_records(path)
    records.write_records(path, sorted(rows, key=lambda r: order.get(r.id, len(order))))


def _balance(config) -> None:
    """Stage 2b: keep closed-ended records answer-balanced per question text (vital_jax.data.balance); the
    dropped ones go to balance_dropped.jsonl. Idempotent: a balanced file stays as it is."""
    path = os.path.join(config.out_dir, records.RECORDS_FILE)
    kept, dropped = balance.balance_closed_answers(records.read_records(path), seed=config.seed)
    if dropped:
        dropped_path = os.path.join(config.out_dir, balance.DROPPED_FILE)
        previous = records.read_records(dropped_path) if os.path.exists(dropped_path) else []
        # A build stopped between the two writes set these records aside already: keep one copy of each.
        seen = {r.id for r in previous}
        records.write_records(dropped_path, previous + [r for r in dropped if r.id not in seen])  # before
        records.write_records(path, kept)  # records.jsonl shrinks: nothing is lost


def _check_roi_config(config) -> None:
    if importlib.util.find_spec("vital_jax.data.roi") is None:
        raise BuildError("config.roi.enabled but vital_jax.data.roi is not installed")
    if not config.roi.encoder_dir:
        raise BuildError("config.roi.enabled needs roi.encoder_dir (a HF MedSigLIP/SigLIP directory)")


def run_roi_stage(config) -> None:
    """Stage 3: the ROI extractor of vital_jax.data.roi (imported only here: it needs the model code)."""
    _check_roi_config(config)
    roi = importlib.import_module("vital_jax.data.roi")
    roi.extract_dataset_rois(config.out_dir, config.roi.encoder_dir, threshold=config.roi.threshold,
                             padding=config.roi.padding, batch_size=config.roi.batch_size)


# What a build writes into out_dir (moved aside by on_change = "rebuild"), besides build_inputs.json. The ROI
# write journal goes last, so a rebuild killed midway never leaves the ROI files it warns about without it.
OUTPUT_FILES = (questions.QUESTIONS_FILE, records.RECORDS_FILE, teacher.REJECTED_FILE, teacher.SUMMARY_FILE,
                balance.DROPPED_FILE, records.ROI_FEATURES_FILE, records.ROI_TOP_PATCH_IDS_FILE,
                records.ROI_TOP_PATCH_SCORES_FILE, records.GLOBAL_FEATURES_FILE, records.ROI_PROVENANCE_FILE,
                records.ROI_WRITE_JOURNAL)
OUTPUT_FOLDERS = ("images", "masks")
REPLACED_PREFIX = "replaced-"


def _prepared(out_dir: str) -> bool:
    """Whether stage 1 finished: questions.jsonl, written last by `prepare`, or a file of a later stage exists."""
    return any(os.path.exists(os.path.join(out_dir, name)) for name in OUTPUT_FILES)


def _has_outputs(out_dir: str) -> bool:
    return (any(os.path.exists(os.path.join(out_dir, name)) for name in OUTPUT_FILES) or
            any(os.path.isdir(os.path.join(out_dir, name)) and os.listdir(os.path.join(out_dir, name))
                for name in OUTPUT_FOLDERS))


def check_inputs(config) -> None:
    """Stage 0: record the build's inputs in out_dir; a folder built from other inputs is refused, naming what
    changed, or with config.on_change = "rebuild" emptied of the old outputs first. A build that never finished
    stage 1 (no questions.jsonl, nothing later) is not refused: its images and masks are written again. Old
    outputs are moved into out_dir/replaced-<UTC time>/, never deleted: the teacher's answers may have been paid
    for."""
    out_dir = config.out_dir
    previous = build_inputs.read(out_dir)
    current = build_inputs.fingerprint(config, previous)
    built = _has_outputs(out_dir)  # without outputs there is nothing to be stale
    if built and previous is None:
        logging.warning("%s holds outputs of a build that did not record its inputs: they are reused as they are, "
                        "unchecked; rebuild into an empty folder to be sure they match this config", out_dir)
    changes = build_inputs.differences(previous, current) if built and previous is not None else []
    if changes and config.on_change == "refuse" and not _prepared(out_dir):
        # Nothing but images and masks of an interrupted stage 1, which this build writes again. None is deleted:
        # one it does not write again stays, unused (it may be the user's, there before the first build).
        logging.warning("%s: an unfinished build (no %s yet) from other inputs (%s); building over its images and "
                        "masks (--config.on_change=rebuild moves them aside first)", out_dir, questions.QUESTIONS_FILE,
                        "; ".join(changes[:10]))
        changes = []
    if changes and config.on_change == "refuse":
        raise BuildError(
            f"{out_dir} was built from other inputs, so its files would be stale: " + "; ".join(changes[:10]) +
            ("; ..." if len(changes) > 10 else "") + ". Rebuild it with --config.on_change=rebuild (moves its "
            f"questions, records, images, masks and ROI arrays into {os.path.join(out_dir, REPLACED_PREFIX)}<UTC "
            "time>/), build into another out_dir, or, to keep its files as they are, delete "
            f"{os.path.join(out_dir, build_inputs.INPUTS_FILE)}")
    if changes:
        aside = _move_outputs_aside(out_dir)
        logging.warning("%s: inputs changed (%s); moved the old outputs into %s (delete it when they are not "
                        "needed) and rebuilding", out_dir, "; ".join(changes[:10]), aside)
    _make_out_dir(out_dir)
    build_inputs.write(out_dir, current)


def _move_outputs_aside(out_dir: str) -> str:
    """Rename the outputs into a new out_dir/replaced-<UTC time>/ (within out_dir: cheap) and build_inputs.json
    last, so a kill midway leaves the rest to be moved by the rerun; returns that folder."""
    stem = os.path.join(out_dir, REPLACED_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    aside, n = stem, 1
    while os.path.exists(aside):  # a second rebuild within the same second
        n += 1
        aside = f"{stem}-{n}"
    os.makedirs(aside)
    for name in OUTPUT_FILES + OUTPUT_FOLDERS + (build_inputs.INPUTS_FILE,):
        if os.path.exists(os.path.join(out_dir, name)):
            os.rename(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


def _make_out_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file on the way, no permission
        raise BuildError(f"config.out_dir={out_dir!r}: cannot create the folder ({e})") from e


def build(config) -> dict:
    """Run the stages; returns {"questions" (all the build asked, this run or before), "records", "set_aside"
    (answered, then left out by answer balancing), "splits", "distill" (this run's teacher summary)}.

    One build at a time in an out_dir (out_dir/RUNNING.lock, as a training workdir's): a second one is refused
    with WorkdirInUseError naming the first. Two at once both paid the teacher for every question and appended
    every record twice."""
    check_config(config)
    _make_out_dir(config.out_dir)  # here, for the error naming config.out_dir: the lock would create it too
    # No stage reads RUNNING.lock; on_change="rebuild" leaves it in place.
    with WorkdirLock(config.out_dir, flag="--config.out_dir"):
        return _build(config)


def _build(config) -> dict:
    check_inputs(config)
    asked = prepare(config)
    all_questions = len(asked)
    dropped_path = os.path.join(config.out_dir, balance.DROPPED_FILE)
    if os.path.exists(dropped_path):  # answered before and set aside by balancing: not asked again
        set_aside = {r.id for r in records.read_records(dropped_path)}
        asked = [q for q in asked if q.id not in set_aside]
    if config.teacher.dry_run:  # what the teacher would be asked, and nothing after it
        return {"questions": all_questions, "dry_run": teacher.dry_run(
            asked, config.out_dir, config.teacher.max_regenerations,
            config.teacher.max_retries if config.teacher.kind == "api" else 0)}
    summary = teacher.distill(asked, config.out_dir, _teacher(config), workers=config.teacher.workers,
                              max_regenerations=config.teacher.max_regenerations)
    if summary["failed_unfinished"]:
        raise BuildError(f"{summary['failed_unfinished']} question(s) unfinished (teacher unreachable or bad "
                         f"input, see {os.path.join(config.out_dir, teacher.REJECTED_FILE)}); rerun to retry them")
    _sort_records(config.out_dir, asked)
    if config.balance_closed_answers:
        _balance(config)
    if config.roi.enabled:
        run_roi_stage(config)
    problems = records.validate_dataset(config.out_dir)
    if problems:
        raise BuildError(f"{config.out_dir}: {len(problems)} problem(s), first: " + "; ".join(problems[:5]))
    rows = records.read_records(os.path.join(config.out_dir, records.RECORDS_FILE))
    splits = {s: sum(r.split == s for r in rows) for s in records.SPLITS}
    set_aside = len(records.read_records(dropped_path)) if os.path.exists(dropped_path) else 0
    return {"questions": all_questions, "records": len(rows), "set_aside": set_aside, "splits": splits,
            "distill": summary}


def main(argv) -> int:
    del argv
    if _CONFIG.value is None:
        cli.usage("--config=configs/data/<name>.py is required")
    config = default_config()
    config.update(_CONFIG.value)
    if config.roi.enabled:  # the only stage that runs jitted programs (the ROI encoder)
        cli.tune_host_memory()
    try:
        result = build(config)
    # ValueError: IngestError, RecordError, InputsError, ImageError, ...; WorkdirInUseError: another build is on;
    # TeacherStopError: no API key, a refused one, or teacher.max_requests spent (the answers so far are kept).
    except (BuildError, ValueError, WorkdirInUseError, teacher.TeacherStopError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "distill"}))
    if "dry_run" in result:
        d = result["dry_run"]
        print(f"teacher dry run: {d['to_ask']} question(s) to ask ({d['finished']} already done), "
              f"{d['requests_at_least']} to {d['requests_at_most']} requests; prompts in {d['prompts']}")
        return 0
    d = result["distill"]
    print(f"teacher: {d['accepted']} accepted, {d['rejected']} rejected, {d['skipped_finished']} already done; "
          f"gate pass rates " + ", ".join(f"{k} {v['pass_rate']}" for k, v in d["gate_rounds"].items()))
    return 0


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/data/*.py file with get_config()")
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
