"""The 5 % human audit (Appendix A.3): the draw, its sheet and overlays, and the leakage rate read back."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from vital_jax.data import audit, records, teacher
from vital_jax.data.records import Record


def _dataset(root, n=40):
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / f"images/img{i}.png")
        mask = np.zeros((12, 16), np.uint8)
        mask[i % 8:i % 8 + 3, 2:6] = 255
        Image.fromarray(mask).save(root / f"masks/img{i}_liver.png")
        kind = ("location", "yes_no")[i % 2]
        rows.append(Record(id=f"r{i:02d}", image=f"images/img{i}.png", mask=f"masks/img{i}_liver.png",
                           question="Where is the liver?" if kind == "location" else "Is the liver visible?",
                           answer="In the upper left." if kind == "location" else "Yes",
                           reasoning_chain=(("A large organ is seen.", "It lies in the upper left.")
                                            if kind == "location" else ("A large organ is seen.",)),
                           latent_steps=2 if kind == "location" else 1, question_type=kind, target="liver",
                           target_type="organ", modality="CT", source="phantom", split="train"))
    records.write_records(str(root / records.RECORDS_FILE), rows)
    return rows


def _read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write(path, rows, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_draw_is_a_seeded_share_of_the_records_with_the_teachers_overlay(tmp_path):
    rows = _dataset(tmp_path / "data")
    by_id = {r.id: r for r in rows}
    drawn = audit.draw_sample(str(tmp_path / "data"), fraction=0.05, seed=3)
    assert len(drawn["ids"]) == 2 == audit.sample_size(40, 0.05)  # ceil(0.05 * 40)
    assert audit.sample_size(41, 0.05) == 3 and audit.sample_size(5, 0.05) == 1
    sheet = _read(tmp_path / "data/audit/sheet.csv")
    assert [s["id"] for s in sheet] == drawn["ids"] == sorted(drawn["ids"])  # records.jsonl order
    for line in sheet:
        record = by_id[line["id"]]
        assert (line["question"], line["answer"], line["question_type"]) == (
            record.question, record.answer, record.question_type)
        assert line["reasoning_chain"].splitlines()[0] == f"1. {record.reasoning_chain[0]}"
        assert line["leakage"] == line["answer_correct"] == line["comment"] == ""
        image = np.asarray(Image.open(tmp_path / "data" / record.image).convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "data" / record.mask)) > 0
        np.testing.assert_array_equal(np.asarray(Image.open(line["overlay"])), teacher.render_overlay(image, mask))
    # The same seed draws the same records into another folder; another seed draws others.
    again = audit.draw_sample(str(tmp_path / "data"), fraction=0.05, seed=3, out_dir=str(tmp_path / "again"))
    assert again["ids"] == drawn["ids"]
    wide = [audit.draw_sample(str(tmp_path / "data"), 0.25, seed, str(tmp_path / f"s{seed}"))["ids"]
            for seed in (0, 1)]
    assert len(wide[0]) == 10 and wide[0] != wide[1]


def test_an_existing_sheet_is_never_overwritten(tmp_path):
    _dataset(tmp_path / "data")
    audit.draw_sample(str(tmp_path / "data"), fraction=0.25)
    sheet = tmp_path / "data/audit/sheet.csv"
    filled = _read(sheet)
    filled[0]["leakage"] = "no"
    _write(sheet, filled)
    before = sheet.read_bytes()
    with pytest.raises(audit.AuditError, match="sheet.csv exists"):
        audit.draw_sample(str(tmp_path / "data"), fraction=0.25, seed=1)
    assert sheet.read_bytes() == before


def test_score_reports_the_rate_with_its_exact_interval_and_the_exit_status_follows_the_threshold(tmp_path,
                                                                                                   capsys):
    _dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    audit.draw_sample(data, fraction=0.25)
    sheet = tmp_path / "data/audit/sheet.csv"
    filled = _read(sheet)
    for i, line in enumerate(filled):
        line["leakage"] = "Yes" if i == 4 else "no"
        line["answer_correct"] = "n" if i in (1, 2) else ("" if i == 9 else "y")
    filled[4]["comment"] = "mentions the red outline"
    # Spreadsheet programs save a byte-order mark first.
    _write(sheet, filled, encoding="utf-8-sig")
    assert audit.main(["score", "--data_dir", data]) == 1  # 1 of 10 is not below 0.3 %
    out = capsys.readouterr().out
    assert "leakage: 1 of 10 = 10.00 %" in out and f"flagged: {filled[4]['id']} (mentions the red outline)" in out
    report = json.loads((tmp_path / "data/audit/audit_report.json").read_text())
    reference = stats.binomtest(1, 10).proportion_ci(0.95, method="exact")
    assert report["leakage"]["rate"] == pytest.approx(0.1)
    assert report["leakage"]["low"] == pytest.approx(reference.low, rel=1e-9)
    assert report["leakage"]["high"] == pytest.approx(reference.high, rel=1e-9)
    assert report["answer_correct"]["count"] == 7 and report["answer_correct"]["total"] == 9
    kind = filled[4]["question_type"]
    assert report["leakage_per_type"][kind]["count"] == 1
    assert sum(r["total"] for r in report["leakage_per_type"].values()) == 10
    assert report["complete"] and report["below_max_leakage_rate"] is False
    assert audit.main(["score", "--data_dir", data, "--max_leakage_rate", "0.2"]) == 0
    assert "observed leakage rate below 20.00 %" in capsys.readouterr().out
    # No leak in all 10: the interval's upper end is 1 - 0.025 ** (1 / 10), and the audit passes.
    for line in filled:
        line["leakage"] = "no"
    _write(sheet, filled)
    assert audit.main(["score", "--data_dir", data]) == 0
    report = json.loads((tmp_path / "data/audit/audit_report.json").read_text())
    assert report["leakage"]["low"] == 0.0
    assert report["leakage"]["high"] == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)


def test_an_incomplete_sheet_counts_only_its_audited_rows(tmp_path, capsys):
    _dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    audit.draw_sample(data, fraction=0.25)
    sheet = tmp_path / "data/audit/sheet.csv"
    filled = _read(sheet)
    filled[0]["leakage"] = "yes"
    filled[1]["leakage"] = "no"
    _write(sheet, filled)
    assert audit.main(["score", "--data_dir", data]) == 0  # no verdict on a partial audit
    assert "audited 2 of 10" in capsys.readouterr().out
    report = json.loads((tmp_path / "data/audit/audit_report.json").read_text())
    assert report["leakage"]["count"] == 1 and report["leakage"]["total"] == 2
    assert not report["complete"] and report["below_max_leakage_rate"] is None


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[3].update(leakage="maybe"), r"sheet.csv row 5 \(id 'r\d\d'\): leakage must be yes or no"),
    (lambda rows: rows.pop(2), "1 sampled id.* have no row"),
    (lambda rows: rows.append(dict(rows[0])), r"sheet.csv row 12 \(id 'r\d\d'\): the id is also on row 2"),
    (lambda rows: rows[0].update(id="nobody"), "'nobody'.*not an id of this sample"),
])
def test_a_damaged_sheet_names_the_row_and_id(tmp_path, edit, message):
    _dataset(tmp_path / "data")
    audit.draw_sample(str(tmp_path / "data"), fraction=0.25)
    sheet = tmp_path / "data/audit/sheet.csv"
    rows = _read(sheet)
    edit(rows)
    _write(sheet, rows)
    with pytest.raises(audit.AuditError, match=message):
        audit.score(str(tmp_path / "data"))


def test_a_sheet_of_another_version_of_the_dataset_is_refused(tmp_path, capsys):
    rows = _dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    audit.draw_sample(data, fraction=0.25)
    records.write_records(str(tmp_path / "data" / records.RECORDS_FILE), rows[:-1])
    with pytest.raises(SystemExit) as exit_:
        audit.main(["score", "--data_dir", data])
    assert exit_.value.code == 1
    assert "changed since the sample" in capsys.readouterr().err
    with pytest.raises(audit.AuditError, match="fraction must be in"):
        audit.draw_sample(data, fraction=0.0, out_dir=str(tmp_path / "zero"))


def test_a_missing_sheet_or_a_damaged_sample_file_is_named(tmp_path):
    _dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    with pytest.raises(audit.AuditError, match="no audit sheet"):
        audit.score(data)
    audit.draw_sample(data, fraction=0.25)
    (tmp_path / "data/audit/sample.json").write_text('{"ids": "r01"}')
    with pytest.raises(audit.AuditError, match="sample.json: not a sample this command wrote"):
        audit.score(data)
    (tmp_path / "data/audit/sample.json").write_text('{"ids": [')
    with pytest.raises(audit.AuditError, match="sample.json"):
        audit.score(data)


def test_teacher_text_that_a_spreadsheet_would_evaluate_is_written_as_text(tmp_path):
    rows = _dataset(tmp_path / "data", n=4)
    rows[1] = Record(**{**rows[1].to_dict(), "answer": "=HYPERLINK(\"http://x\")", "question": "-1 or +1?",
                        "reasoning_chain": ("@step",)})
    records.write_records(str(tmp_path / "data" / records.RECORDS_FILE), rows)
    audit.draw_sample(str(tmp_path / "data"), fraction=1.0)
    line = {s["id"]: s for s in _read(tmp_path / "data/audit/sheet.csv")}[rows[1].id]
    assert line["answer"] == "'=HYPERLINK(\"http://x\")" and line["question"] == "'-1 or +1?"
    assert line["reasoning_chain"] == "1. @step"                  # numbered: it starts with a digit
    assert audit.score(str(tmp_path / "data"))["sampled"] == 4   # ids are written as they are, and read back
