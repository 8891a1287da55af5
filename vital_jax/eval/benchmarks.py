"""Benchmark loaders: every benchmark becomes a list of `BenchmarkExample`s that a model answers one string each.

    examples = load_benchmark("vqa_rad", "/data/vqa_rad", split="test", limit=100)
    predictions = [model_answer(e.image, e.prompt) for e in examples]
    metrics = vital_jax.eval.metrics.score(examples, predictions)

Supported (`BENCHMARKS`), with the files each reads from `data_dir`:
  vqa_rad     {split}set.json (trainset.json / testset.json), images/<image_name>         (Lau et al., 2018)
  slake       train.json / validate.json (or validation.json) / test.json, imgs/<img_name>; English questions only
  pathvqa     {split}.jsonl or {split}.json with image, question, answer[, answer_type]; images/[{split}/]<image>
  pmc_vqa     {split}.csv, {split}_2.csv, {split}.jsonl or {split}.json with Figure_path, Question, Choice A-D,
              Answer_label (or a letter / option text in Answer); images/<Figure_path>; default split test_clean
  in_domain   records.jsonl of vital_jax's dataset format, rows of `split`, turned closed-ended (App. B.4)
  jsonl       {split}.jsonl with id, image, question, answer, answer_type[, options, match]; images relative
              to data_dir

The first four are also read from Hugging Face Hub copies (format="hf", or "auto" when the release file is not
there): parquet shards such as data/{split}-*.parquet or `save_to_disk` arrow shards, images inside the table
(`vital_jax.eval.hf_files`; each loader's docstring names the copies it was written against).

Malformed input raises `BenchmarkError` naming the file and the record (line number or index, and id; the row of a
parquet / arrow file).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import re
import reprlib
import zlib
from typing import Callable, Sequence

import numpy as np

from vital_jax.data import images
from vital_jax.data import questions
from vital_jax.data.questions import CLOSED_TYPES
from vital_jax.data.records import QUESTION_TYPES, RECORDS_FILE, LineError, iter_jsonl
from vital_jax.eval import metrics
from vital_jax.eval.errors import BenchmarkError
from vital_jax.jsonio import read_json, read_text

ANSWER_TYPES = ("closed", "open")
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
IN_DOMAIN_CHOICE_INSTRUCTION = "Answer with one of the options."
# Question types of the in-domain dataset that are closed-ended as generated (App. B.4 keeps them as they are).
IN_DOMAIN_NATIVE_CLOSED = ("yes_no", "location_choice")


@dataclasses.dataclass(frozen=True)
class BenchmarkExample:
    """One benchmark question.

    `image` is a path on this machine; `prompt` is the text to give the model (the question, plus its options for
    multiple choice); `answer` is the ground truth (an option letter when `match == "letter"`); `answer_type` is
    "closed" or "open"; `options` the choices (empty for free-form questions); `match` how a prediction is scored
    (`vital_jax.eval.metrics`: "vqa", "letter", "exact" or "f1"); `extra` the source's other fields.
    """

    id: str
    image: str
    question: str
    answer: str
    answer_type: str
    options: tuple[str, ...] = ()
    match: str = "vqa"
    prompt: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise BenchmarkError(f"example {self.id!r}: answer_type must be one of {ANSWER_TYPES}, "
                                 f"got {self.answer_type!r}")
        if self.match not in metrics.MATCH_KINDS:
            raise BenchmarkError(f"example {self.id!r}: match must be one of {metrics.MATCH_KINDS}, got {self.match!r}")
        if self.match == "letter" and (self.answer not in metrics.LETTERS[:len(self.options)]):
            raise BenchmarkError(f"example {self.id!r}: answer {self.answer!r} is not the letter of one of its "
                                 f"{len(self.options)} options")
        if not self.prompt:
            object.__setattr__(self, "prompt", self.question)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["options"] = list(self.options)
        return data


def lettered_prompt(question: str, options: Sequence[str], instruction: str = CHOICE_INSTRUCTION) -> str:
    """The question, then one "A. option" line per option (`metrics.lettered_option`), then the instruction."""
    lines = [question.strip()] + [metrics.lettered_option(i, o) for i, o in enumerate(options)]
    return "\n".join(lines + ([instruction] if instruction else []))


# ---------------------------------------------------------------------------------------------------- file helpers

def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: {what} not found")
    return path


def _first_existing(data_dir: str, names: Sequence[str], what: str) -> str:
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise BenchmarkError(f"{data_dir}: no {what} (looked for {', '.join(names)})")


def _read_json_list(path: str) -> list[tuple[str, dict]]:
    """(label, record) pairs of a JSON array file; the label names the file and index for error messages."""
    data = read_json(path, BenchmarkError)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return [(f"{path}: record {i}", r) for i, r in enumerate(data)]


def _read_jsonl(path: str) -> list[tuple[str, dict]]:
    out = []
    for number, record in iter_jsonl(path):
        if isinstance(record, LineError):
            raise BenchmarkError(f"{path}:{number}: {record}")
        out.append((f"{path}:{number}", record))
    return out


def _read_json_or_jsonl(path: str) -> list[tuple[str, dict]]:
    return _read_jsonl(path) if path.endswith(".jsonl") else _read_json_list(path)


def _read_csv(path: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(read_text(path, BenchmarkError), newline=""))
    # Line numbers count the header as line 1 (quoted newlines inside fields aside).
    rows = [(f"{path}:{i + 2}", row) for i, row in enumerate(reader)]
    for label, row in rows:
        if None in row:  # DictReader files a row's extra fields under None: an unquoted comma shifted its columns
            raise BenchmarkError(f"{label}: {len(row[None])} field(s) more than the header's "
                                 f"{len(reader.fieldnames)} columns (an unquoted comma?)")
    return rows


# Fields that may be numbers as well as text: answers (VQA-RAD has integer answers) and ids (VQA-RAD's qid).
_TEXT_OR_NUMBER_FIELDS = ("answer", "id", "qid", "index")


def _fields(label: str, record, names: Sequence[str], unchecked: Sequence[str] = ()) -> list:
    """The named fields of a record; a missing or empty one, or one that is not a string (a string or a number
    for `_TEXT_OR_NUMBER_FIELDS`), is a BenchmarkError naming the record. `unchecked`: fields whose type the
    caller checks (a Hub image cell is a struct or a path)."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{label}: a record must be a JSON object, got {type(record).__name__}")
    rid = next((record[k] for k in ("id", "qid", "index") if k in record), None)
    where = label + (f" (id {rid!r})" if rid is not None else "")
    missing = [n for n in names if record.get(n) is None or (isinstance(record.get(n), str) and not
                                                             record[n].strip())]
    if missing:
        raise BenchmarkError(f"{where}: missing or empty field(s) {', '.join(missing)}")
    for name in names:
        value, numbers = record[name], name in _TEXT_OR_NUMBER_FIELDS
        if name not in unchecked and not (isinstance(value, str) or numbers and isinstance(value, (int, float))
                                          and not isinstance(value, bool)):
            raise BenchmarkError(f"{where}: field {name} must be a string{' or a number' if numbers else ''}, got "
                                 f"{type(value).__name__} {reprlib.repr(value)}")
        if isinstance(value, float) and not math.isfinite(value):   # how a table writes a missing number
            raise BenchmarkError(f"{where}: field {name} is {value} (missing in the source?)")
    return [record[n] for n in names]


def _check_image(label: str, path: str, check: bool) -> str:
    """`path`, checked (when `check`) by the checks every stage applies (vital_jax.data.images: mode, size) and
    decoded once, so that a bad or truncated image stops the loader, naming the record and the file, before the
    model loads (as the Hub route's ImageCache does); a decode takes about 1 ms for a VQA-RAD image."""
    if check and not os.path.isfile(path):
        raise BenchmarkError(f"{label}: image not found: {path}")
    if check:
        stat = os.stat(path)
        try:
            _check_decoded(path, stat.st_size, stat.st_mtime_ns)
        except images.ImageError as e:
            raise BenchmarkError(f"{label}: {e}") from e
    return path


@functools.lru_cache(maxsize=1 << 16)
def _check_decoded(path: str, size: int, mtime_ns: int) -> None:
    """Once per version of a file (size, mtime) however many questions share it; errors are not cached."""
    del size, mtime_ns
    images.check_file(path, decode=True)


def _answer_type(label: str, value) -> str:
    """"closed"/"open" from "CLOSED", "OPEN", "closed " (VQA-RAD has trailing spaces) etc."""
    kind = str(value).strip().lower()
    if kind not in ANSWER_TYPES:
        raise BenchmarkError(f"{label}: answer_type must be CLOSED or OPEN, got {value!r}")
    return kind


def _text(value) -> str:
    """Answers may be numbers in the source files (VQA-RAD has 10 integer answers)."""
    return " ".join(str(value).split())


def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items if limit is None else items[:limit]


# -------------------------------------------------------------------------------------------------------- loaders
#
# VQA-RAD, SLAKE, PathVQA and PMC-VQA are read from their original releases (JSON / JSONL / CSV beside an image
# folder) or from the files of a Hugging Face Hub copy (parquet shards, images inside; see `hf_files`). Both
# routes turn a record into an example with the same function, so closed/open and option rules do not depend on
# where the data came from.

FORMATS = ("auto", "release", "hf")


def _release_or_hf(data_dir: str, names: Sequence[str], what: str, split: str,
                   format: str) -> tuple[str | None, list[str]]:
    """(the first of `names` in data_dir, []) or (None, the Hugging Face files of `split`).

    format="auto" takes the release file when there is one, else the Hugging Face files; "release" / "hf" only
    look for the one kind.
    """
    if format not in FORMATS:
        raise BenchmarkError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format != "hf":
        for name in names:
            if os.path.isfile(os.path.join(data_dir, name)):
                return os.path.join(data_dir, name), []
    if format != "release":
        from vital_jax.eval import hf_files

        files = hf_files.split_files(data_dir, split)
        if files:
            return None, files
    looked = ([", ".join(names)] if format != "hf" else []) + \
             ([f"Hugging Face files {_hf_layouts(split)}"] if format != "release" else [])
    raise BenchmarkError(f"{data_dir}: no {what} (looked for {'; or '.join(looked)})")


def _hf_layouts(split: str) -> str:
    from vital_jax.eval import hf_files

    return hf_files.layouts_text(split)


def _free_form_example(label: str, rid, image: str, question, answer, kind, extra: dict) -> BenchmarkExample:
    """A free-form question. Closed or open as the source says (`kind`: CLOSED / OPEN) or, when it says nothing,
    closed when the answer is yes or no (PathVQA's own split of the two, and all a Hub copy without an
    answer_type column allows); closed ones are scored by normalised accuracy, open ones by token F1."""
    answer = _text(answer)
    kind = _answer_type(label, kind) if kind is not None else ("closed" if metrics.is_yes_no(answer) else "open")
    return BenchmarkExample(id=str(rid), image=image, question=str(question).strip(), answer=answer,
                            answer_type=kind, match="vqa" if kind == "closed" else "f1", extra=extra)


# Columns of a Hub copy of a free-form benchmark: {canonical name: accepted column names}, matched after
# hf_files.column_key. The image column holds an Image struct (bytes, path) or a path under the image folder.
HF_FREE_FORM_COLUMNS = {"image": ("image", "img_name", "image_name", "img", "image_path"),
                        "question": ("question",), "answer": ("answer",)}
HF_FREE_FORM_OPTIONAL = {"answer_type": ("answer_type",), "id": ("qid", "id", "question_id"),
                         "q_lang": ("q_lang",)}


def _hf_image(label: str, value, data_dir: str, folders: Sequence[str], cache, check: bool) -> str:
    """The path of a Hub image cell: its bytes written to the cache, or its path resolved under data_dir."""
    from vital_jax.eval import hf_files

    data, name = hf_files.split_image(label, value)
    if data is not None:
        return cache.store(label, data)
    if name:
        return _resolve_image(label, data_dir, name, folders, check)
    raise BenchmarkError(f"{label}: the image cell has neither bytes nor a path")


def _hf_rows(files: Sequence[str], required: dict, optional: dict, columns: dict | None,
             one_of: Sequence[tuple[str, ...]] = ()):
    """(label, row, the file's columns that were mapped) for every row of the files: the row's own columns plus
    each canonical name of `required` / `optional` (hf_files.resolve_columns) with its column's value; `one_of`
    groups of optional names of which the file must have at least one."""
    from vital_jax.eval import hf_files

    for path in files:
        names, rows = hf_files.read_table(path)
        found = hf_files.resolve_columns(path, names, required, optional, columns)
        absent = [" or ".join(group) for group in one_of if not any(name in found for name in group)]
        if absent:
            raise hf_files.column_error(path, names, absent)
        mapped = set(found.values())
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", {**row, **{canonical: row[column] for canonical, column in found.items()}}, mapped


def _load_hf_free_form(data_dir: str, split: str, files: Sequence[str], folders: Sequence[str], limit: int | None,
                       check_images: bool, image_cache: str | None, columns: dict | None,
                       extra_keys: Sequence[str] | None, english_only: bool = False) -> list[BenchmarkExample]:
    """VQA-RAD, SLAKE or PathVQA from Hub files; `extra_keys` the other columns to keep (None: all scalars)."""
    from vital_jax.eval import hf_files

    cache = hf_files.ImageCache(image_cache, verify=check_images)
    canonical = set(HF_FREE_FORM_COLUMNS) | set(HF_FREE_FORM_OPTIONAL)
    out = []
    for label, record, mapped in _hf_rows(files, HF_FREE_FORM_COLUMNS, HF_FREE_FORM_OPTIONAL, columns):
        if limit is not None and len(out) >= limit:
            break
        language = record.get("q_lang")
        if language is not None and not isinstance(language, str):
            raise BenchmarkError(f"{label}: q_lang is a {type(language).__name__} ({language!r}), expected a "
                                 "language code such as 'en'")
        if english_only and language not in (None, "en"):
            continue
        if record.get("id") is None:
            record["id"] = f"{split}_{len(out)}"
        elif isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
            raise BenchmarkError(f"{label}: the id column holds a {type(record['id']).__name__} "
                                 f"({reprlib.repr(record['id'])}), expected a string or an integer")
        image, question, answer = _fields(label, record, ("image", "question", "answer"), unchecked=("image",))
        label = f"{label} (id {record['id']!r})"
        image = _hf_image(label, image, data_dir, folders, cache, check_images)
        if extra_keys is not None:
            extra = {k: record[k] for k in extra_keys if k in record}
        else:
            # The other scalar columns; those that are the example itself (by either name) are not extras.
            extra = {k: v for k, v in record.items()
                     if k not in canonical and k not in mapped and not isinstance(v, (dict, list, bytes))}
        out.append(_free_form_example(label, record["id"], image, question, answer, record.get("answer_type"),
                                      extra))
    return out


_VQA_RAD_EXTRA = ("qid", "image_organ", "question_type", "phrase_type")


def load_vqa_rad(data_dir: str, split: str = "test", limit: int | None = None, check_images: bool = True,
                 format: str = "auto", image_cache: str | None = None,
                 columns: dict | None = None) -> list[BenchmarkExample]:
    """VQA-RAD: `{split}set.json`, a JSON array of {qid, image_name, image_organ, answer, answer_type, question_type,
    question, phrase_type}, images under `images/`; closed questions are scored by normalised accuracy, open ones
    by token F1.

    Or a Hugging Face copy (format="hf", or "auto" without the JSON), e.g. flaviagiammarino/vqa-rad:
    `data/{split}-*.parquet` with image (bytes), question, answer. Without an answer_type column, yes/no answers
    are closed and the rest open: on the 451 test questions that is 251 closed, where the release's CLOSED type
    has 272. Images in the table are written to `image_cache` (`hf_files.default_image_cache()` by default);
    `columns` maps canonical names (HF_FREE_FORM_COLUMNS) to other column names.
    """
    path, files = _release_or_hf(data_dir, (f"{split}set.json",), f"VQA-RAD {split} file", split, format)
    if files:
        return _limited(_load_hf_free_form(data_dir, split, files, ("images", ""), limit, check_images, image_cache,
                                           columns, _VQA_RAD_EXTRA), limit)
    out = []
    for label, record in _read_json_list(path):
        qid, image_name, question, answer, kind = _fields(
            label, record, ("qid", "image_name", "question", "answer", "answer_type"))
        label = f"{label} (qid {qid!r})"
        image = _check_image(label, os.path.join(data_dir, "images", image_name), check_images)
        extra = {k: record[k] for k in _VQA_RAD_EXTRA if k in record}
        out.append(_free_form_example(label, qid, image, question, answer, kind, extra))
    return _limited(out, limit)


# BoKelvin/SLAKE on the Hub renamed validate.json to validation.json.
_SLAKE_SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"),
                      "validate": ("validate.json", "validation.json"),
                      "validation": ("validation.json", "validate.json"), "test": ("test.json",)}
_SLAKE_EXTRA = ("qid", "img_id", "content_type", "base_type", "modality", "location")


def load_slake(data_dir: str, split: str = "test", limit: int | None = None, check_images: bool = True,
               format: str = "auto", image_cache: str | None = None,
               columns: dict | None = None) -> list[BenchmarkExample]:
    """SLAKE (English subset): `train.json` / `validate.json` (or `validation.json`) / `test.json` arrays of {qid,
    img_name, question, answer, answer_type, q_lang, ...}; only q_lang == "en" rows are kept; images under `imgs/`.

    Or a Hugging Face copy in parquet with the same columns, the image as bytes or an `img_name` under `imgs/`;
    rows are filtered on q_lang when the table has it (English-only copies have not). Without answer_type, yes/no
    answers are closed. `image_cache` and `columns` as in `load_vqa_rad`.
    """
    if split not in _SLAKE_SPLIT_FILES:
        raise BenchmarkError(f"SLAKE split must be one of {sorted(_SLAKE_SPLIT_FILES)}, got {split!r}")
    path, files = _release_or_hf(data_dir, _SLAKE_SPLIT_FILES[split], f"SLAKE {split} file", split, format)
    if files:
        return _limited(_load_hf_free_form(data_dir, split, files, ("imgs", ""), limit, check_images, image_cache,
                                           columns, _SLAKE_EXTRA, english_only=True), limit)
    out = []
    for label, record in _read_json_list(path):
        (lang,) = _fields(label, record, ("q_lang",))
        if lang != "en":
            continue
        image_name, question, answer, kind = _fields(label, record, ("img_name", "question", "answer", "answer_type"))
        qid = record.get("qid", len(out))
        label = f"{label} (qid {qid!r})"
        image = _check_image(label, os.path.join(data_dir, "imgs", image_name), check_images)
        extra = {k: record[k] for k in _SLAKE_EXTRA if k in record}
        out.append(_free_form_example(label, qid, image, question, answer, kind, extra))
    return _limited(out, limit)


def _resolve_image(label: str, data_dir: str, name: str, folders: Sequence[str], check: bool) -> str:
    """The first of data_dir/<folder>/<name> that exists (".jpg" added to a name without extension)."""
    names = [name] if os.path.splitext(name)[1] else [name, name + ".jpg", name + ".png"]
    candidates = [os.path.join(data_dir, folder, n) for folder in folders for n in names]
    for path in candidates:
        if os.path.isfile(path):
            return _check_image(label, path, check)
    if check:
        raise BenchmarkError(f"{label}: image {name!r} not found under {data_dir} (looked in "
                             f"{', '.join(f or '.' for f in folders)})")
    return candidates[0]


def load_pathvqa(data_dir: str, split: str = "test", limit: int | None = None, check_images: bool = True,
                 format: str = "auto", image_cache: str | None = None,
                 columns: dict | None = None) -> list[BenchmarkExample]:
    """PathVQA: `{split}.jsonl` or `{split}.json` with {image, question, answer[, answer_type, id]}. Without an
    answer_type, yes/no answers are closed and the rest open (PathVQA's own split of the two).

    Or a Hugging Face copy, e.g. flaviagiammarino/path-vqa (`data/{split}-*.parquet` with image bytes, question,
    answer; its splits are train, validation and test). `image_cache` and `columns` as in `load_vqa_rad`.
    """
    try:
        path, files = _release_or_hf(data_dir, (f"{split}.jsonl", f"{split}.json"), f"PathVQA {split} file", split,
                                     format)
    except BenchmarkError as e:
        pickled = os.path.join(data_dir, "qas", split, f"{split}_qa.pkl")
        if os.path.isfile(pickled):  # the original release's question files
            raise BenchmarkError(
                f"{e}. {pickled} is the original release's pickle, which vital_jax does not read (unpickling runs "
                "code stored in the file): use the Hub copy flaviagiammarino/path-vqa (parquet), or write the "
                f"records you trust to {split}.jsonl, one {{\"image\", \"question\", \"answer\"}} per line, "
                "images under images/") from None
        raise
    folders = ("images/" + split, "images", "")
    if files:
        return _limited(_load_hf_free_form(data_dir, split, files, folders, limit, check_images, image_cache,
                                           columns, None), limit)
    out = []
    for label, record in _read_json_or_jsonl(path):
        image_name, question, answer = _fields(label, record, ("image", "question", "answer"))
        rid = str(record.get("id", f"{split}_{len(out)}"))
        label = f"{label} (id {rid!r})"
        image = _resolve_image(label, data_dir, str(image_name), folders, check_images)
        extra = {k: v for k, v in record.items() if k not in ("image", "question", "answer", "answer_type", "id")}
        out.append(_free_form_example(label, rid, image, question, answer, record.get("answer_type"), extra))
    return _limited(out, limit)


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])\)?\s*[:.)]\s*")


def _strip_option_prefix(text: str, letter: str) -> str:
    """PMC-VQA writes options as "A:CT scan " (sometimes "A. ..."); keep the text."""
    match = _OPTION_PREFIX.match(text)
    if match and match.group(1) == letter:
        text = text[match.end():]
    return " ".join(text.split())


def _pmc_vqa_example(label: str, row: dict, rid: str, image_of: Callable[[str, object], str],
                     figure_name) -> BenchmarkExample:
    """One PMC-VQA row of the release's columns (Figure_path, Question, Choice A.., Answer_label / Answer);
    `image_of(label, Figure_path value)` gives the image path."""
    figure, question = _fields(label, row, ("Figure_path", "Question"), unchecked=("Figure_path",))
    letters = [c for c in metrics.LETTERS if row.get(f"Choice {c}") not in (None, "")]
    if len(letters) < 2 or letters != list(metrics.LETTERS[:len(letters)]):
        raise BenchmarkError(f"{label}: needs consecutive options Choice A, Choice B, ...; has "
                             f"{', '.join('Choice ' + c for c in letters) or 'none'}")
    # A list or a mapping would become its repr as an option's text; numbers are options as they read.
    wrong = [f"Choice {c}" for c in letters if isinstance(row[f"Choice {c}"], bool)
             or not isinstance(row[f"Choice {c}"], (str, int, float))]
    if wrong:
        raise BenchmarkError(f"{label}: {', '.join(wrong)} must be text or a number")
    options = tuple(_strip_option_prefix(str(row[f"Choice {c}"]), c) for c in letters)
    raw = row.get("Answer_label") or row.get("Answer")
    if raw is None or not str(raw).strip():
        raise BenchmarkError(f"{label}: missing answer (Answer_label or Answer)")
    raw = str(raw).strip()
    letter = raw.upper() if raw.upper() in letters else None
    if letter is None:
        matches = [c for c, o in zip(letters, options)
                   if metrics.normalize_answer(o) == metrics.normalize_answer(_strip_option_prefix(raw, raw[:1]))]
        letter = matches[0] if len(matches) == 1 else None
    if letter is None:
        raise BenchmarkError(f"{label}: answer {raw!r} is neither an option letter nor one option's text")
    image = image_of(f"{label} (id {rid!r})", figure)
    return BenchmarkExample(id=rid, image=image, question=" ".join(str(question).split()), answer=letter,
                            answer_type="closed", options=options, match="letter",
                            prompt=lettered_prompt(str(question), options),
                            extra={"answer_text": options[letters.index(letter)], "figure": figure_name})


# Columns of a Hub copy of PMC-VQA, under the release's names (the CSV's own columns, or e.g. "image", "question",
# "choice a", "answer label" as in parquet conversions).
HF_PMC_VQA_COLUMNS = {"Figure_path": ("image", "figure_path", "figure", "img"), "Question": ("question",),
                      "Choice A": ("choice_a",), "Choice B": ("choice_b",)}
HF_PMC_VQA_OPTIONAL = {**{f"Choice {c}": (f"choice_{c.lower()}",) for c in metrics.LETTERS[2:]},
                       "Answer_label": ("answer_label", "label"), "Answer": ("answer", "anwser"),
                       "index": ("index", "id")}


def load_pmc_vqa(data_dir: str, split: str = "test_clean", limit: int | None = None, check_images: bool = True,
                 format: str = "auto", image_cache: str | None = None,
                 columns: dict | None = None) -> list[BenchmarkExample]:
    """PMC-VQA multiple choice: rows with Figure_path, Question, Choice A..D and the answer letter (Answer_label,
    or Answer when it is a letter or an option's text). The prompt lists the options; scored by parsed letter.

    The default split is `test_clean` (`test_clean.csv`, 2,000 questions): Table 1's PMC-VQA values are
    multiples of 1/2,000 (61.70 = 1,234 / 2,000). `split="test"` reads the full `test.csv` / `test_2.csv`.
    xmcmic/PMC-VQA on the Hub is this release (CSVs; unzip images.zip into `images/`). Parquet copies are read
    too (format="hf"): the same columns in any case and spacing, the image as bytes or a Figure_path; `columns`
    maps the release's names (HF_PMC_VQA_COLUMNS) to others, `image_cache` as in `load_vqa_rad`.
    """
    path, files = _release_or_hf(data_dir, (f"{split}.csv", f"{split}_2.csv", f"{split}.jsonl", f"{split}.json"),
                                 f"PMC-VQA {split} file", split, format)
    folders = ("images", "figures", "")
    out = []
    if files:
        from vital_jax.eval import hf_files

        cache = hf_files.ImageCache(image_cache, verify=check_images)
        for label, row, _ in _hf_rows(files, HF_PMC_VQA_COLUMNS, HF_PMC_VQA_OPTIONAL, columns,
                                   one_of=[("Answer_label", "Answer")]):
            if limit is not None and len(out) >= limit:
                break
            figure = row.get("Figure_path")
            name = figure if isinstance(figure, str) or figure is None else hf_files.split_image(label, figure)[1]
            out.append(_pmc_vqa_example(
                label, row, str(row.get("index") or f"{split}_{len(out)}"),
                lambda where, value: _hf_image(where, value, data_dir, folders, cache, check_images), name))
        return _limited(out, limit)
    rows = _read_csv(path) if path.endswith(".csv") else _read_json_or_jsonl(path)
    for label, row in rows:
        rid = str(row.get("index") or row.get("id") or f"{split}_{len(out)}")
        out.append(_pmc_vqa_example(
            label, row, rid, lambda where, value: _resolve_image(where, data_dir, str(value), folders, check_images),
            row.get("Figure_path")))
    return _limited(out, limit)


def _option_letter(label: str, answer: str, options: tuple[str, ...]) -> str:
    """The letter of a multiple-choice answer given as a letter or as an option's text."""
    keys = [metrics.normalize_answer(o) for o in options]
    if len(options) > len(metrics.LETTERS) or not all(keys) or len(set(keys)) < len(keys):
        raise BenchmarkError(f"{label}: options must be 1 to {len(metrics.LETTERS)} distinct, non-empty texts "
                             f"(after normalisation), got {list(options)}")
    if answer.strip().upper() in metrics.LETTERS[:len(options)]:
        return answer.strip().upper()
    if metrics.normalize_answer(answer) in keys:
        return metrics.LETTERS[keys.index(metrics.normalize_answer(answer))]
    raise BenchmarkError(f"{label}: answer {answer!r} is neither an option letter nor one of the options "
                         f"{list(options)}")


def load_jsonl(data_dir: str, split: str = "test", limit: int | None = None,
               check_images: bool = True) -> list[BenchmarkExample]:
    """A generic benchmark: `{split}.jsonl` of {id (unique), image, question, answer, answer_type} (+ optional
    `options`, a list, with the answer then an option letter or an option's text, `match` to override the scoring,
    `prompt`); image paths relative to data_dir. With options the question is multiple choice: the prompt lists
    them lettered (unless `prompt` is given) and the answer is scored as its letter (`match` "letter", which also
    accepts the option's text); the options must be distinct and non-empty after normalisation, at most
    len(metrics.LETTERS)."""
    path = _require_file(os.path.join(data_dir, f"{split}.jsonl"), f"{split}.jsonl")
    out, seen = [], {}
    for label, record in _read_jsonl(path):
        rid, image, question, answer, kind = _fields(label, record, ("id", "image", "question", "answer",
                                                                      "answer_type"))
        if str(rid) in seen:  # predictions are matched to questions by id
            raise BenchmarkError(f"{label} (id {rid!r}): the same id as {seen[str(rid)]}; ids must be unique")
        seen[str(rid)], label = label, f"{label} (id {rid!r})"
        kind = _answer_type(label, kind)
        options = record.get("options") or ()
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
            raise BenchmarkError(f"{label}: options must be a list of strings")
        options, answer = tuple(" ".join(o.split()) for o in options), _text(answer)
        if options:
            match, answer = "letter", _option_letter(label, answer, options)
        else:
            match = "vqa" if kind == "closed" else "f1"
        match = record.get("match", match)
        if record.get("prompt") is not None and not isinstance(record["prompt"], str):
            raise BenchmarkError(f"{label}: prompt must be a string, got {type(record['prompt']).__name__}")
        prompt = record.get("prompt") or (lettered_prompt(question, options) if match == "letter" else question)
        extra = {k: v for k, v in record.items()
                 if k not in ("id", "image", "question", "answer", "answer_type", "options", "match", "prompt")}
        image = _check_image(label, os.path.join(data_dir, image), check_images)  # its errors name the record
        try:
            out.append(BenchmarkExample(id=str(rid), image=image, question=question, answer=answer,
                                        answer_type=kind, options=options, match=match, prompt=prompt, extra=extra))
        except BenchmarkError as e:
            raise BenchmarkError(f"{label}: {e}") from e
    return _limited(out, limit)


# ---------------------------------------------------------------------------------------------------- in-domain

def closed_question(label: str, question_type: str, question: str, answer: str, target: str = ""
                    ) -> tuple[str, tuple[str, ...]]:
    """(ground truth, options) as the in-domain benchmarks pose a yes_no or location_choice record and score it
    (`metrics.in_domain_correct(prediction, ground truth, options, target)`): the record's closed answer as the
    data pipeline reads it (`questions.closed_answer`: "Yes, the liver is visible." is "yes" of ("yes", "no"), a
    location choice the side its answer names of the choices the question offers). label names the record in
    errors (BenchmarkError)."""
    try:
        return questions.closed_answer(question_type, question, answer, target)
    except ValueError as e:
        raise BenchmarkError(f"{label}: {e}") from None


def _distractors(record: dict, gold_key: str, pools: dict, rng: np.random.Generator, wanted: int) -> list[str]:
    """Up to `wanted` distractor texts for one choice question, unique in meaning: answers of the same question
    type about *other* targets (an answer about the same target could be as true of this image), never equal to
    the answer or to each other after `metrics.normalize_answer`; first of the same target type, then of any."""
    qtype, target = record["question_type"], metrics.normalize_answer(record.get("target", ""))
    chosen: dict[str, str] = {}  # normalised -> text
    for key in ((qtype, record.get("target_type")), (qtype, None)):
        pool = sorted((k, text) for k, (text, targets) in pools.get(key, {}).items()
                      if k != gold_key and k not in chosen and target not in targets)
        take = min(wanted - len(chosen), len(pool))
        if take > 0:
            chosen.update(pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False)))
    return list(chosen.values())


def load_in_domain(data_dir: str, split: str = "test", limit: int | None = None, check_images: bool = True,
                   seed: int = 0, num_options: int = 4, open_ended: str = "choice") -> list[BenchmarkExample]:
    """The held-out split of a vital_jax dataset (`records.jsonl`), every question closed-ended (App. B.4).

    yes_no -> options (yes, no), answer its leading yes/no; location_choice -> the choices its question names,
    answer the one the answer names; every other type -> a choice among the answer and up to `num_options - 1`
    distractors (`_distractors`: answers of the same question type about other targets, same target type first,
    unique after normalisation). A question with fewer distinct distractors keeps the options it has (at least
    two; `extra["num_options"]` says how many); one with none cannot be posed as a choice and is an error.
    Distractors and option order are drawn from a generator seeded by (seed, record id), so the benchmark is the
    same on every run and does not depend on `limit`. Scored by `metrics.in_domain_correct`; `extra` keeps the
    record's target (the scorer strips it), source (per-source rows as in Table 1), modality and K.

    open_ended="f1" keeps the types that are not closed as generated open-ended instead (the question as asked,
    scored by token F1 against the answer text, App. B.4): how a model trained on free-form answers is scored
    on them (the `phantom_vqa` benchmark).
    """
    if open_ended not in ("choice", "f1"):
        raise ValueError(f"open_ended must be 'choice' or 'f1', got {open_ended!r}")
    if num_options < 2:
        raise ValueError(f"num_options must be >= 2, got {num_options}")
    path = _require_file(os.path.join(data_dir, RECORDS_FILE), RECORDS_FILE)
    rows = []
    for label, record in _read_jsonl(path):
        _fields(label, record, ("id", "image", "question", "answer", "question_type", "split"))
        label = f"{label} (id {record['id']!r})"
        # An unknown type would be posed as a multiple choice; a non-string target would be compared as text.
        if record["question_type"] not in QUESTION_TYPES:
            raise BenchmarkError(f"{label}: question_type {record['question_type']!r} is not one of "
                                 f"{', '.join(QUESTION_TYPES)}")
        wrong = [k for k in ("target", "target_type", "modality", "source") if k in record
                 and not isinstance(record[k], str)]
        if wrong:
            raise BenchmarkError(f"{label}: field(s) {', '.join(wrong)} must be strings")
        rows.append((label, record))
    # (question type, target type or None) -> normalised answer -> (its text, the normalised targets it is about)
    pools: dict[tuple, dict[str, tuple[str, set]]] = {}
    for _, r in rows:
        for key in ((r["question_type"], r.get("target_type")), (r["question_type"], None)):
            entry = pools.setdefault(key, {}).setdefault(metrics.normalize_answer(r["answer"]),
                                                         (_text(r["answer"]), set()))
            entry[1].add(metrics.normalize_answer(r.get("target", "")))
    out = []
    for label, r in rows:
        if r["split"] != split:
            continue
        if limit is not None and len(out) >= limit:
            break
        qtype, answer, question = r["question_type"], _text(r["answer"]), _text(r["question"])
        prompt, extra = question, {"question_type": qtype, "answer_text": answer}
        extra.update({k: r[k] for k in ("target", "target_type", "modality", "source", "latent_steps") if k in r})
        if qtype in CLOSED_TYPES:
            gold, options = closed_question(label, qtype, question, answer, r.get("target", ""))
        elif open_ended == "f1":
            image_path = _check_image(label, os.path.join(data_dir, r["image"]), check_images)
            out.append(BenchmarkExample(id=str(r["id"]), image=image_path, question=question, answer=answer,
                                        answer_type="open", match="f1", prompt=question, extra=extra))
            continue
        else:
            rng = np.random.default_rng([seed, zlib.crc32(str(r["id"]).encode("utf-8"))])
            texts = _distractors(r, metrics.normalize_answer(answer), pools, rng, num_options - 1)
            if not texts:
                raise BenchmarkError(f"{label}: no {qtype!r} answer about another target in {path} to build "
                                     f"choices from")
            options = tuple(answer if i == 0 else texts[i - 1] for i in rng.permutation(len(texts) + 1))
            gold = answer
            prompt = lettered_prompt(question, options, IN_DOMAIN_CHOICE_INSTRUCTION)
        extra["num_options"] = len(options)
        image_path = _check_image(label, os.path.join(data_dir, r["image"]), check_images)
        out.append(BenchmarkExample(id=str(r["id"]), image=image_path, question=question, answer=gold,
                                    answer_type="closed", options=tuple(options), match="exact", prompt=prompt,
                                    extra=extra))
    return out


# ------------------------------------------------------------------------------------------------------ registry

BENCHMARKS: dict[str, Callable[..., list[BenchmarkExample]]] = {
    "vqa_rad": load_vqa_rad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "pmc_vqa": load_pmc_vqa,
    "in_domain": load_in_domain,
    # PhantomVQA (configs/data/phantom_vqa.py): yes/no and location choices closed, the other types open (F1).
    "phantom_vqa": functools.partial(load_in_domain, open_ended="f1"),
    "jsonl": load_jsonl,
}


# The split each benchmark is evaluated on unless another is asked for (the one the paper's numbers fit).
DEFAULT_SPLITS = {"pmc_vqa": "test_clean"}


def default_split(name: str) -> str:
    return DEFAULT_SPLITS.get(name, "test")


def load_benchmark(name: str, data_dir: str, split: str | None = None, limit: int | None = None,
                   **kwargs) -> list[BenchmarkExample]:
    """The examples of benchmark `name` (a key of BENCHMARKS) read from `data_dir`, the first `limit` of them;
    `split` defaults to `default_split(name)` ("test", or "test_clean" for PMC-VQA)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r} (expected one of {', '.join(sorted(BENCHMARKS))})")
    if not os.path.isdir(data_dir):
        raise BenchmarkError(f"{data_dir}: {name} data directory not found")
    return BENCHMARKS[name](data_dir, split=split or default_split(name), limit=limit, **kwargs)
