"""The dataset record contract shared by the data pipeline, the ROI extractor and the trainer.

A dataset directory holds:
  records.jsonl               one JSON object per line (a `Record`)
  roi_features.npy            float32 (N, dv), one l2-normalised ROI feature per row (dv = 1152 for MedSigLIP)
  roi_top_patch_ids.npy       int32 (N, 5), the top-5 patches by cosine similarity with the ROI feature (App. A.5.2)
  roi_top_patch_scores.npy    float32 (N, 5), their similarities
  global_features.npy         optional float32 (N, dv), same rows: the l2-normalised mean of all patch features of
                              the row's whole image, no mask (f_global of Appendix C.5, for per-step targets)
  roi_features.json           how the ROI features were made (encoder directory, feature layer, A.5 settings)
  .roi_write_pending.json     only while the ROI stage renames its files into place; left by a crash, it means the
                              files above may come from different runs, and every loader refuses the directory
  the image and mask files that records name by paths relative to the directory.

`roi_index` is the record's row in the three ROI arrays, or -1 before ROI extraction; the arrays are absent until
the ROI stage (vital_jax.data.roi) has run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Iterator

import numpy as np

from vital_jax.data import images
from vital_jax.jsonio import append_json_line, atomic_write, read_json, utf8_problem

RECORDS_FILE = "records.jsonl"
ROI_FEATURES_FILE = "roi_features.npy"
ROI_TOP_PATCH_IDS_FILE = "roi_top_patch_ids.npy"
ROI_TOP_PATCH_SCORES_FILE = "roi_top_patch_scores.npy"
ROI_TOP_PATCHES = 5
GLOBAL_FEATURES_FILE = "global_features.npy"
# How the ROI features were made (`data.roi.extract_dataset_rois`): the encoder directory, its feature layer and the
# A.5 settings, so a tool comparing model outputs with encoder patches (explain's heatmaps, the training probe)
# encodes them the same way.
ROI_PROVENANCE_FILE = "roi_features.json"
# The ROI stage writes its files (the arrays, ROI_PROVENANCE_FILE, records.jsonl last) one rename after another, so
# it lists them here first (`roi.write_files_atomically`) and removes this journal once all are in place: a crash
# between two renames would otherwise leave new arrays beside the old records' roi_index, unnoticed.
ROI_WRITE_JOURNAL = ".roi_write_pending.json"

QUESTION_TYPES = ("yes_no", "identify", "location_choice", "location", "describe", "reasoning")
# Allowed reasoning depth K per question type (App. A.2, "Question-type-aware prompting"; Table 4).
STEP_RANGES = {"yes_no": (1, 1), "identify": (1, 1), "location_choice": (1, 1), "location": (2, 2),
               "describe": (2, 3), "reasoning": (3, 4)}
TARGET_TYPES = ("organ", "lesion", "other")
MODALITIES = ("CT", "MRI", "ultrasound", "X-Ray", "pathology", "endoscope", "fundus", "OCT", "dermoscopy")
SPLITS = ("train", "val", "test")
MAX_LATENT_STEPS = 4
UNIT_NORM_TOLERANCE = 1e-3


class RecordError(ValueError):
    """A record or a records file does not satisfy the contract; the message names the file, line and id."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One training sample: (image, question, answer, K-step reasoning chain, ROI feature row) plus metadata.

    `group` is the volume or patient the image was cut from (an MSD / DICOM case id), which splits keep whole;
    empty (2-D sources, and datasets written before the field existed) means the image is its own group
    (`split_group`).
    """

    id: str
    image: str
    mask: str
    question: str
    answer: str
    reasoning_chain: tuple[str, ...]
    latent_steps: int
    question_type: str
    target: str
    target_type: str
    modality: str
    source: str
    split: str
    roi_index: int = -1
    group: str = ""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise RecordError(f"record {self.id!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every contract violation of this record's own fields (files and ROI rows are checked elsewhere)."""
        out = []
        for name in ("id", "image", "mask", "question", "answer", "target", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                out.append(f"{name} must be a non-empty string, got {value!r}")
        for name in ("image", "mask"):
            value = getattr(self, name)
            if isinstance(value, str) and (os.path.isabs(value) or ".." in value.split("/")):
                out.append(f"{name} must be a path relative to the dataset directory, got {value!r}")
        chain = self.reasoning_chain
        if not isinstance(chain, tuple) or not all(isinstance(s, str) and s.strip() for s in chain):
            out.append("reasoning_chain must be a list of non-empty strings")
        if not isinstance(self.latent_steps, int) or isinstance(self.latent_steps, bool):
            out.append(f"latent_steps must be an int, got {self.latent_steps!r}")
        else:
            if not 1 <= self.latent_steps <= MAX_LATENT_STEPS:
                out.append(f"latent_steps={self.latent_steps} is outside 1..{MAX_LATENT_STEPS}")
            if isinstance(chain, tuple) and self.latent_steps != len(chain):
                out.append(f"latent_steps={self.latent_steps} != len(reasoning_chain)={len(chain)}")
        if self.question_type not in QUESTION_TYPES:
            out.append(f"unknown question_type {self.question_type!r} (expected one of {', '.join(QUESTION_TYPES)})")
        if self.target_type not in TARGET_TYPES:
            out.append(f"unknown target_type {self.target_type!r} (expected one of {', '.join(TARGET_TYPES)})")
        if self.modality not in MODALITIES:
            out.append(f"unknown modality {self.modality!r} (expected one of {', '.join(MODALITIES)})")
        if self.split not in SPLITS:
            out.append(f"unknown split {self.split!r} (expected one of {', '.join(SPLITS)})")
        if not isinstance(self.roi_index, int) or isinstance(self.roi_index, bool) or self.roi_index < -1:
            out.append(f"roi_index must be an int >= -1, got {self.roi_index!r}")
        if not isinstance(self.group, str):
            out.append(f"group must be a string (empty: the image is its own group), got {self.group!r}")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """From a parsed JSON object; unknown or missing fields are errors (naming the id when there is one)."""
        if not isinstance(data, dict):
            raise RecordError(f"a record must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        label = f"record {data.get('id')!r}"
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            parts = (([f"missing fields {missing}"] if missing else []) +
                     ([f"unknown fields {unknown}"] if unknown else []))
            raise RecordError(f"{label}: " + "; ".join(parts))
        chain = data["reasoning_chain"]
        if not isinstance(chain, list):
            raise RecordError(f"{label}: reasoning_chain must be a list of strings, got {type(chain).__name__}")
        return cls(**{**data, "reasoning_chain": tuple(chain)})

    def to_dict(self) -> dict:
        """A JSON-ready dict (the chain as a list), field order as declared. An empty `group` is left out: a dataset
        of 2-D sources keeps the records.jsonl it had before the field existed when a command rewrites it (the
        ROI command)."""
        data = dataclasses.asdict(self)
        data["reasoning_chain"] = list(self.reasoning_chain)
        if not data["group"]:
            del data["group"]
        return data


def split_group(item) -> str:
    """The key a split keeps whole for a Record or a questions.Question: its `group` (volume / patient), else its
    image."""
    return item.group or item.image


def read_records(path: str) -> list[Record]:
    """All records of a JSONL file. Raises RecordError naming the file, the line number and the id."""
    if not os.path.isfile(path):
        raise RecordError(f"{path}: records file not found")
    records = []
    for number, data in iter_jsonl(path):
        if isinstance(data, LineError):
            raise RecordError(f"{path}:{number}: {data}")
        try:
            records.append(Record.from_dict(data))
        except (RecordError, TypeError) as e:
            raise RecordError(f"{path}:{number}: {e}") from e
    return records


@dataclasses.dataclass(frozen=True)
class LineError:
    """What `iter_jsonl` yields for a line that is not a JSON object: why (the caller adds the file and line)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | LineError]]:
    """(line number, parsed object) per non-empty line of a JSONL file. A line that is not UTF-8, not JSON or not
    a JSON object yields a `LineError` instead, so callers choose to stop or to collect every problem."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, LineError(utf8_problem(raw, e))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                # Some of json's messages end in "at" ("Invalid control character at"), meant for its own ": line".
                reason = e.msg.removesuffix(" at")
                yield number, LineError(f"malformed JSON ({reason} at column {e.colno})")
                continue
            if isinstance(data, dict):
                yield number, data
            else:
                yield number, LineError(f"not a JSON object (a JSON {_json_kind(data)})")


def _json_kind(value) -> str:
    kinds = {str: "string", list: "array", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def append_record(path: str, record: Record) -> None:
    """Append one record as one line and fsync (`jsonio.append_json_line`: a torn last line stays one malformed
    line that `read_records` reports, instead of corrupting the record appended after it)."""
    append_json_line(path, record.to_dict())


def write_records(path: str, records: Iterable[Record]) -> None:
    """Replace `path` with `records` atomically (write a temporary file, fsync, rename)."""
    write_jsonl_atomic(path, (record.to_dict() for record in records))


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """Replace `path` with one JSON object per line, atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def pending_roi_write(data_dir: str) -> list[str] | None:
    """The files an unfinished ROI write was renaming into place (its `ROI_WRITE_JOURNAL`), or None when there is
    no journal. A journal that cannot be parsed gives [] (it still marks the directory as unfinished)."""
    path = os.path.join(data_dir, ROI_WRITE_JOURNAL)
    if not os.path.exists(path):
        return None
    try:
        journal = read_json(path, RecordError)
    except RecordError:
        return []
    targets = journal.get("targets") if isinstance(journal, dict) else None  # {target name: its temporary}
    if not isinstance(targets, dict):
        return []
    # Names only: the ROI writer deletes stray temporaries named after these, so none may point elsewhere.
    return [name for name in targets if name == os.path.basename(name)]


def interrupted_roi_write(data_dir: str) -> str | None:
    """Why the directory's ROI files cannot be used, when an ROI write stopped between its renames (its journal
    `ROI_WRITE_JOURNAL` is still there), or None. The message names the journal and the command that repairs it."""
    targets = pending_roi_write(data_dir)
    if targets is None:
        return None
    flag = " --global_features" if GLOBAL_FEATURES_FILE in targets else ""
    return (f"{os.path.join(data_dir, ROI_WRITE_JOURNAL)}: an ROI write was interrupted while renaming its files "
            f"into place, so the ROI arrays, {ROI_PROVENANCE_FILE} and {RECORDS_FILE} (its roi_index) may come from "
            f"different runs; rerun python -m vital_jax.data.roi --data_dir={data_dir} --encoder_dir=ENCODER_DIR"
            f"{flag}, which rewrites them all and removes the journal")


def roi_provenance(data_dir: str) -> dict | None:
    """How the dataset's ROI features were made (`ROI_PROVENANCE_FILE`: encoder_dir, feature_layer, dim, the A.5
    settings), or None for a dataset written before the file existed; a malformed file, or an interrupted ROI write
    (the file may not describe the arrays), is a RecordError naming it."""
    problem = interrupted_roi_write(data_dir)
    if problem:
        raise RecordError(problem)
    path = os.path.join(data_dir, ROI_PROVENANCE_FILE)
    if not os.path.exists(path):
        return None
    provenance = read_json(path, RecordError)
    if not isinstance(provenance, dict) or not isinstance(provenance.get("feature_layer"), str):
        raise RecordError(f"{path}: expected a JSON object with a string 'feature_layer'")
    return provenance


def roi_feature_layer(data_dir: str) -> str:
    """The encoder output the dataset's ROI features pool (`roi_provenance`): "last_block" (A.5.2, the default) or
    "post_layernorm". A dataset written before the file existed was made with "last_block" unless its builder
    chose otherwise, which nothing recorded."""
    if not data_dir:
        return "last_block"
    provenance = roi_provenance(data_dir)
    return "last_block" if provenance is None else provenance["feature_layer"]


def load_roi_arrays(data_dir: str) -> dict[str, np.ndarray] | None:
    """The three ROI arrays memory-mapped (`features`, `top_patch_ids`, `top_patch_scores`), or None if none exist.

    Raises RecordError when only some exist, their shapes/dtypes disagree with the contract, or an ROI write was
    interrupted between its renames (`interrupted_roi_write`: the arrays may not match records.jsonl's roi_index).
    """
    problem = interrupted_roi_write(data_dir)
    if problem:
        raise RecordError(problem)
    files = {"features": ROI_FEATURES_FILE, "top_patch_ids": ROI_TOP_PATCH_IDS_FILE,
             "top_patch_scores": ROI_TOP_PATCH_SCORES_FILE}
    present = {k: os.path.join(data_dir, v) for k, v in files.items() if os.path.exists(os.path.join(data_dir, v))}
    if not present:
        return None
    if len(present) != len(files):
        missing = sorted(files[k] for k in files if k not in present)
        raise RecordError(f"{data_dir}: ROI arrays incomplete, missing {', '.join(missing)}")
    arrays = {}
    for key, path in present.items():
        try:
            arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise RecordError(f"{path}: unreadable .npy file ({e})") from e
    expected = {"features": (np.float32, 2, None), "top_patch_ids": (np.int32, 2, ROI_TOP_PATCHES),
                "top_patch_scores": (np.float32, 2, ROI_TOP_PATCHES)}
    rows = arrays["features"].shape[0] if arrays["features"].ndim else -1
    for key, (dtype, ndim, width) in expected.items():
        a = arrays[key]
        if a.dtype != dtype or a.ndim != ndim or (width is not None and a.shape[1] != width) or a.shape[0] != rows:
            want = f"{np.dtype(dtype).name} ({rows}, {width if width is not None else 'dv'})"
            raise RecordError(f"{present[key]}: {a.dtype.name} {a.shape}, expected {want}")
    return arrays


def load_global_features(data_dir: str) -> np.ndarray | None:
    """`global_features.npy` memory-mapped, or None when absent. Raises RecordError when it is unreadable or its
    shape / dtype disagree with roi_features.npy (float32, one row per ROI row, same dv)."""
    path = os.path.join(data_dir, GLOBAL_FEATURES_FILE)
    if not os.path.exists(path):
        return None
    roi = load_roi_arrays(data_dir)
    if roi is None:
        raise RecordError(f"{path} exists but the ROI arrays do not; rerun vital_jax.data.roi")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise RecordError(f"{path}: unreadable .npy file ({e})") from e
    if array.dtype != np.float32 or array.shape != roi["features"].shape:
        raise RecordError(f"{path}: {array.dtype.name} {array.shape}, expected float32 {roi['features'].shape} "
                          f"(the shape of {ROI_FEATURES_FILE})")
    return array


def validate_dataset(data_dir: str, check_files: bool = True) -> list[str]:
    """Every problem of a dataset directory, one message per problem, each naming the record id (empty: valid).

    Checks each record's fields, duplicate ids, that its image passes the checks every stage applies
    (vital_jax.data.images: readable, size limits, modes), that its mask is a non-empty 0/255 mask of the image's
    size (`check_files=False` skips the files), and for `roi_index >= 0` that the ROI row exists, is finite and
    unit-norm (after an interrupted ROI write: one problem naming its journal instead), and that no `group`
    (volume / patient) spans splits: its slices are near-duplicates, so one in train and one in test leaks. A
    malformed line of records.jsonl is reported by line number and validation goes on.
    """
    path = os.path.join(data_dir, RECORDS_FILE)
    if not os.path.isfile(path):
        return [f"{path}: records file not found"]
    problems: list[str] = []
    records: list[Record] = []
    for number, data in iter_jsonl(path):
        if isinstance(data, LineError):
            problems.append(f"{path}:{number}: {data}")
            continue
        try:
            records.append(Record.from_dict(data))
        except (RecordError, TypeError) as e:
            problems.append(f"{path}:{number}: {e}")
    # After an interrupted ROI write, rows may belong to other records: one problem, not a row check per record.
    interrupted = interrupted_roi_write(data_dir)
    roi = None
    if interrupted:
        problems.append(interrupted)
    else:
        try:
            roi = load_roi_arrays(data_dir)
        except RecordError as e:
            problems.append(str(e))
    if roi is not None:
        try:
            global_rows = load_global_features(data_dir)
        except RecordError as e:
            problems.append(str(e))
        else:
            if global_rows is not None:
                norms = np.linalg.norm(np.asarray(global_rows, np.float64), axis=1)
                bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE))
                if bad.size:
                    problems.append(f"{os.path.join(data_dir, GLOBAL_FEATURES_FILE)}: {bad.size} row(s) not finite "
                                    f"and unit-norm, e.g. rows {bad[:5].tolist()}")
    seen: set[str] = set()
    checked: dict[str, tuple | str] = {}
    for record in records:
        label = f"record {record.id!r}"
        if record.id in seen:
            problems.append(f"{label}: duplicate id")
        seen.add(record.id)
        if check_files:
            problems.extend(f"{label}: {p}" for p in _file_problems(data_dir, record, checked))
        if record.roi_index >= 0 and not interrupted:
            problems.extend(f"{label}: {p}" for p in _roi_problems(roi, record.roi_index))
    problems.extend(_group_leaks(records))
    return problems


def _group_leaks(records: list[Record]) -> list[str]:
    """One problem per group (volume / patient) whose records lie in more than one split, naming a record of
    each split. Records without a group are their image's own and not checked here."""
    first_of: dict[str, dict[str, str]] = {}
    for record in records:
        if record.group:
            first_of.setdefault(record.group, {}).setdefault(record.split, record.id)
    return [f"group {group!r} spans splits " + ", ".join(f"{split} (e.g. record {rid!r})"
                                                       for split, rid in sorted(by_split.items())) +
            ": slices of one volume or patient must stay in one split (questions.assign_splits)"
            for group, by_split in first_of.items() if len(by_split) > 1]


def _file_problems(data_dir: str, record: Record, checked: dict[str, tuple | str]) -> list[str]:
    """The image and mask checks every stage applies (vital_jax.data.images), each file checked once
    (`checked`: path -> image shape, mask shape or the problem)."""
    out, shapes = [], {}
    for name in ("image", "mask"):
        path = os.path.join(data_dir, getattr(record, name))
        if path not in checked:
            try:
                if not os.path.isfile(path):
                    checked[path] = f"{name} file missing: {path}"
                elif name == "image":
                    checked[path] = images.load_image(path).shape[:2]
                else:
                    checked[path] = images.load_mask(path, None).shape
            except images.ImageError as e:
                checked[path] = f"{name} file unusable: {e}"
        if isinstance(checked[path], str):
            out.append(checked[path])
        else:
            shapes[name] = checked[path]
    if len(shapes) == 2 and shapes["image"] != shapes["mask"]:
        out.append(f"mask size {shapes['mask'][::-1]} != image size {shapes['image'][::-1]}")
    return out


def _roi_problems(roi: dict[str, np.ndarray] | None, index: int) -> list[str]:
    if roi is None:
        return [f"roi_index={index} but the dataset has no ROI arrays"]
    rows = roi["features"].shape[0]
    if index >= rows:
        return [f"roi_index={index} out of range (ROI arrays have {rows} rows)"]
    feature = np.asarray(roi["features"][index], dtype=np.float64)
    if not np.all(np.isfinite(feature)):
        return [f"ROI feature row {index} is not finite"]
    norm = float(np.linalg.norm(feature))
    if not math.isclose(norm, 1.0, abs_tol=UNIT_NORM_TOLERANCE):
        return [f"ROI feature row {index} has norm {norm:.4f}, expected 1 (l2-normalised)"]
    if not np.all(np.isfinite(roi["top_patch_scores"][index])):
        return [f"ROI top-patch scores row {index} is not finite"]
    if np.any(np.asarray(roi["top_patch_ids"][index]) < 0):
        return [f"ROI top-patch ids row {index} has negative patch ids"]
    return []
