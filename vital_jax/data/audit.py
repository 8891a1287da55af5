"""The human audit of a built dataset (Appendix A.3, "Human audit"): a random 5 % of the final records, each with
the teacher-only overlay it was written from, in a sheet a person fills in; then the leakage rate it shows.

    python -m vital_jax.data.audit sample --data_dir=DIR [--fraction=0.05] [--seed=0] [--out=DIR/audit]
    python -m vital_jax.data.audit score --data_dir=DIR [--out=DIR/audit] [--max_leakage_rate=0.003]

`sample` writes into `out`:
  sheet.csv       one row per sampled record (id, split, question type, modality, target, question, the numbered
                  reasoning chain, answer, the image and its overlay), and three columns for the auditor:
                  `leakage` (yes / no: does any text betray the marked-up view: the mask, its colour or outline,
                  the hidden target label, measurements only a mask gives), `answer_correct` (yes / no, optional)
                  and `comment`. Comma-separated UTF-8, as spreadsheets open and save it; a text cell that a
                  spreadsheet would read as a formula (=, +, -, @ first) starts with an apostrophe.
  overlays/       ROW.png: the image with its mask as the teacher saw it (vital_jax.data.teacher.render_overlay).
  sample.json     the draw (fraction, seed, ids) and the sha256 of records.jsonl, so a score of a sheet drawn from
                  another version of the dataset is refused.
An existing sheet.csv is never overwritten (it may hold a person's verdicts): `sample` refuses, naming it.

`score` reads the sheet back (rows with an empty `leakage` are not audited yet), writes `audit_report.json` beside
it and prints the observed leakage rate with its exact (Clopper-Pearson) 95 % interval, overall and per question
type, and the flagged ids. The paper reports a rate below 0.3 % on its 5 % audit; `score` exits 1 when every row
is audited and the observed rate is not below `--max_leakage_rate`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
from PIL import Image
from scipy import stats

from vital_jax.data import ingest, records, teacher
from vital_jax.jsonio import atomic_write, file_sha256, read_json

SHEET_FILE = "sheet.csv"
SAMPLE_FILE = "sample.json"
REPORT_FILE = "audit_report.json"
OVERLAY_DIR = "overlays"
AUDIT_FRACTION = 0.05        # Appendix A.3: "a 5 % random audit of the final dataset"
MAX_LEAKAGE_RATE = 0.003     # the paper's observed rate: "< 0.3 %"
RECORD_COLUMNS = ("id", "split", "question_type", "modality", "target", "question", "reasoning_chain", "answer",
                  "image", "overlay")
VERDICT_COLUMNS = ("leakage", "answer_correct", "comment")
_YES, _NO = ("yes", "y"), ("no", "n")
# A cell starting with one of these is a formula to a spreadsheet program (CSV injection): the teacher's text comes
# from an outside service, so such a cell is written with a leading apostrophe, which the program shows as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class AuditError(ValueError):
    """The audit cannot be drawn or scored; the message names the file (and the sheet's row and id)."""


def sample_size(num_records: int, fraction: float) -> int:
    """How many of `num_records` records an audit of `fraction` reads: rounded up, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise AuditError(f"fraction must be in (0, 1], got {fraction}")
    return min(num_records, max(1, math.ceil(fraction * num_records)))


def _records(data_dir: str) -> tuple[str, list[records.Record]]:
    path = os.path.join(data_dir, records.RECORDS_FILE)
    try:
        return path, records.read_records(path)
    except records.RecordError as e:
        raise AuditError(str(e)) from e


def _numbered(chain) -> str:
    return "\n".join(f"{i}. {step}" for i, step in enumerate(chain, 1))


def _as_text(value: str) -> str:
    """`value` as a cell a spreadsheet shows as text, never evaluates (`_FORMULA_STARTS`)."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def draw_sample(data_dir: str, fraction: float = AUDIT_FRACTION, seed: int = 0, out_dir: str | None = None) -> dict:
    """Write the audit sheet, overlays and sample.json for a random `fraction` of data_dir's records (drawn
    without replacement by `seed`; sheet rows in records.jsonl order). Returns sample.json's content."""
    out_dir = out_dir or os.path.join(data_dir, "audit")
    sheet = os.path.join(out_dir, SHEET_FILE)
    if os.path.exists(sheet):
        raise AuditError(f"{sheet} exists (it may hold an auditor's verdicts): score it, or move it away to draw "
                         f"another sample")
    path, rows = _records(data_dir)
    if not rows:
        raise AuditError(f"{path}: no records to audit")
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), sample_size(len(rows), fraction),
                                                        replace=False))
    os.makedirs(os.path.join(out_dir, OVERLAY_DIR), exist_ok=True)
    lines = []
    for number, index in enumerate(chosen.tolist()):
        record = rows[index]
        try:
            image = ingest.load_rgb(os.path.join(data_dir, record.image))
            mask = ingest.load_mask(os.path.join(data_dir, record.mask), image.shape[:2])
        except ingest.IngestError as e:
            raise AuditError(f"record {record.id!r}: {e}") from e
        overlay = os.path.join(OVERLAY_DIR, f"{number:05d}.png")
        atomic_write(os.path.join(out_dir, overlay),
                     lambda f: Image.fromarray(teacher.render_overlay(image, mask)).save(f, format="PNG"),
                     binary=True)
        lines.append(dict(id=record.id, split=record.split, question_type=record.question_type,
                          modality=record.modality, target=_as_text(record.target),
                          question=_as_text(record.question), reasoning_chain=_numbered(record.reasoning_chain),
                          answer=_as_text(record.answer),
                          image=os.path.abspath(os.path.join(data_dir, record.image)),
                          overlay=os.path.abspath(os.path.join(out_dir, overlay)),
                          leakage="", answer_correct="", comment=""))
    drawn = dict(records_sha256=file_sha256(path), records=len(rows), fraction=fraction, seed=seed,
                 ids=[line["id"] for line in lines])
    atomic_write(os.path.join(out_dir, SAMPLE_FILE), lambda f: json.dump(drawn, f, indent=1))

    def write_sheet(f) -> None:
        writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS + VERDICT_COLUMNS)
        writer.writeheader()
        writer.writerows(lines)

    atomic_write(sheet, write_sheet)  # last: its presence says the draw is complete
    return drawn


def _verdict(value: str, column: str, where: str) -> bool | None:
    """yes -> True, no -> False, empty -> None (not audited yet); anything else is an error naming `where`."""
    text = value.strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    if not text:
        return None
    raise AuditError(f"{where}: {column} must be yes or no (or empty), got {value!r}")


def _read_drawn(out_dir: str) -> dict:
    path = os.path.join(out_dir, SAMPLE_FILE)
    drawn = read_json(path, AuditError)
    fields = dict(records_sha256=str, records=int, fraction=float, seed=int, ids=list)
    if not isinstance(drawn, dict) or any(not isinstance(drawn.get(k), t) for k, t in fields.items()):
        raise AuditError(f"{path}: not a sample this command wrote (expected {', '.join(fields)})")
    return drawn


def read_sheet(out_dir: str) -> list[dict]:
    """The sheet's rows as {"id", "question_type", "leakage", "answer_correct", "comment"} (verdicts True / False /
    None when empty), checked against sample.json: every sampled id once, nothing else, and records.jsonl as it was
    when drawn is the caller's check (`score`)."""
    sheet = os.path.join(out_dir, SHEET_FILE)
    if not os.path.isfile(sheet):
        raise AuditError(f"{sheet}: no audit sheet (draw one with `python -m vital_jax.data.audit sample`)")
    drawn = _read_drawn(out_dir)
    # utf-8-sig: spreadsheet programs often save a byte-order mark first.
    with open(sheet, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "question_type") + VERDICT_COLUMNS[:2] if c not in (reader.fieldnames or ())]
        if missing:
            raise AuditError(f"{sheet}: no column(s) {', '.join(missing)} in the header {reader.fieldnames} "
                             f"(comma-separated, as `sample` wrote it)")
        out, seen = [], {}
        # Rows as a spreadsheet numbers them (the header is row 1): a reasoning chain spans several lines of the
        # file, so line numbers would not match what the auditor sees.
        for number, row in enumerate(reader, 2):
            where = f"{sheet} row {number} (id {row.get('id')!r})"
            if row["id"] not in drawn["ids"]:
                raise AuditError(f"{where}: not an id of this sample ({SAMPLE_FILE})")
            if row["id"] in seen:
                raise AuditError(f"{where}: the id is also on row {seen[row['id']]}")
            seen[row["id"]] = number
            out.append(dict(id=row["id"], question_type=row["question_type"],
                            leakage=_verdict(row["leakage"] or "", "leakage", where),
                            answer_correct=_verdict(row["answer_correct"] or "", "answer_correct", where),
                            comment=(row.get("comment") or "").strip()))
    lost = [i for i in drawn["ids"] if i not in seen]
    if lost:
        raise AuditError(f"{sheet}: {len(lost)} sampled id(s) have no row, e.g. {lost[0]!r}")
    return out


def rate(count: int, total: int, confidence: float = 0.95) -> dict:
    """count / total with its exact (Clopper-Pearson) two-sided interval; all None when total is 0."""
    if total == 0:
        return dict(count=0, total=0, rate=None, low=None, high=None)
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if count == 0 else float(stats.beta.ppf(tail, count, total - count + 1))
    high = 1.0 if count == total else float(stats.beta.ppf(1.0 - tail, count + 1, total - count))
    return dict(count=count, total=total, rate=count / total, low=low, high=high)


def score(data_dir: str, out_dir: str | None = None, max_leakage_rate: float = MAX_LEAKAGE_RATE) -> dict:
    """Score the filled sheet of out_dir (default data_dir/audit) and write audit_report.json there."""
    out_dir = out_dir or os.path.join(data_dir, "audit")
    rows = read_sheet(out_dir)
    drawn = _read_drawn(out_dir)
    path = os.path.join(data_dir, records.RECORDS_FILE)
    if not os.path.isfile(path):
        raise AuditError(f"{path}: records file not found")
    if file_sha256(path) != drawn["records_sha256"]:
        raise AuditError(f"{path} changed since the sample in {out_dir} was drawn: the sheet audits another "
                         f"version of the dataset (draw a new sample into another --out)")
    audited = [r for r in rows if r["leakage"] is not None]
    flagged = [r for r in audited if r["leakage"]]
    judged = [r for r in audited if r["answer_correct"] is not None]
    per_type = {}
    for kind in sorted({r["question_type"] for r in rows}):
        of_kind = [r for r in audited if r["question_type"] == kind]
        per_type[kind] = rate(sum(r["leakage"] for r in of_kind), len(of_kind))
    leakage = rate(len(flagged), len(audited))
    complete = len(audited) == len(rows)
    report = dict(records=drawn["records"], sampled=len(rows), audited=len(audited), complete=complete,
                  fraction=drawn["fraction"], seed=drawn["seed"], leakage=leakage, leakage_per_type=per_type,
                  answer_correct=rate(sum(r["answer_correct"] for r in judged), len(judged)),
                  flagged=[dict(id=r["id"], comment=r["comment"]) for r in flagged],
                  max_leakage_rate=max_leakage_rate,
                  below_max_leakage_rate=(leakage["rate"] < max_leakage_rate) if complete else None)
    atomic_write(os.path.join(out_dir, REPORT_FILE), lambda f: json.dump(report, f, indent=1))
    return report


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def describe(report: dict) -> str:
    """The report as the lines `score` prints."""
    leak = report["leakage"]
    lines = [f"audited {report['audited']} of {report['sampled']} sampled records "
             f"({100 * report['fraction']:g} % of {report['records']}, seed {report['seed']})"
             + ("" if report["complete"] else ": incomplete, rows with an empty `leakage` are not counted")]
    if leak["total"]:
        lines.append(f"leakage: {leak['count']} of {leak['total']} = {_percent(leak['rate'])} "
                     f"(95 % interval {_percent(leak['low'])} to {_percent(leak['high'])})")
        for kind, r in report["leakage_per_type"].items():
            if r["total"]:
                lines.append(f"  {kind:<16} {r['count']} of {r['total']} = {_percent(r['rate'])}")
    correct = report["answer_correct"]
    if correct["total"]:
        lines.append(f"answer correct: {correct['count']} of {correct['total']} = {_percent(correct['rate'])} "
                     f"(95 % interval {_percent(correct['low'])} to {_percent(correct['high'])})")
    for item in report["flagged"]:
        lines.append(f"flagged: {item['id']}" + (f" ({item['comment']})" if item["comment"] else ""))
    if report["complete"]:
        below = "below" if report["below_max_leakage_rate"] else "NOT below"
        lines.append(f"observed leakage rate {below} {_percent(report['max_leakage_rate'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from vital_jax import cli

    parser = cli.ArgumentParser(prog="python -m vital_jax.data.audit",
                                description="The 5 % human audit of a built dataset (Appendix A.3).")
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("sample", help="draw the records to audit and write the sheet and overlays")
    grade = commands.add_parser("score", help="read the filled sheet and report the leakage rate")
    for command in (draw, grade):
        command.add_argument("--data_dir", required=True, help="a built dataset directory (records.jsonl)")
        command.add_argument("--out", default=None, help="the audit directory (default DATA_DIR/audit)")
    draw.add_argument("--fraction", type=float, default=AUDIT_FRACTION, help="share of records drawn (0.05)")
    draw.add_argument("--seed", type=int, default=0, help="seed of the draw")
    grade.add_argument("--max_leakage_rate", type=float, default=MAX_LEAKAGE_RATE,
                       help="exit 1 when the complete audit's observed rate is not below this (0.003)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        cli.usage(f"--data_dir={args.data_dir}: no such directory")
    cli.require_directories(out=args.out)
    try:
        if args.command == "sample":
            drawn = draw_sample(args.data_dir, args.fraction, args.seed, args.out)
            out = args.out or os.path.join(args.data_dir, "audit")
            print(f"drew {len(drawn['ids'])} of {drawn['records']} records; fill in the `leakage` (and "
                  f"`answer_correct`) columns of {os.path.join(out, SHEET_FILE)}, then run `score`")
            return 0
        report = score(args.data_dir, args.out, args.max_leakage_rate)
    except (AuditError, OSError) as e:
        cli.fail(e)
    print(describe(report))
    return 1 if report["complete"] and not report["below_max_leakage_rate"] else 0


if __name__ == "__main__":
    sys.exit(main())
