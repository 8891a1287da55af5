"""Record contract: round trip, line-numbered errors, crash-safe append, dataset validation of every bad record."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import records
from vital_jax.data.records import Record, RecordError


def _record(i: int, **overrides) -> Record:
    fields = dict(id=f"s{i}", image=f"images/img{i}.png", mask=f"masks/img{i}_liver.png",
                  question="Where is the liver located in this image?", answer="The liver is in the upper left.",
                  reasoning_chain=("A large homogeneous structure is seen.", "It lies in the upper left."),
                  latent_steps=2, question_type="location", target="liver", target_type="organ", modality="CT",
                  source="phantom", split="train", roi_index=-1)
    fields.update(overrides)
    return Record(**fields)


def _mask(size):
    """A 0/255 mask of PIL `size` (width, height) with a few foreground pixels."""
    mask = np.zeros(size[::-1], np.uint8)
    mask[1:4, 1:4] = 255
    return Image.fromarray(mask)


def _write_dataset(root, n=3, roi_rows=None, size=(16, 12)):
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", size).save(root / f"images/img{i}.png")
        _mask(size).save(root / f"masks/img{i}_liver.png")
        rows.append(_record(i, roi_index=i if roi_rows is not None else -1))
    records.write_records(str(root / records.RECORDS_FILE), rows)
    if roi_rows is not None:
        np.save(root / records.ROI_FEATURES_FILE, roi_rows.astype(np.float32))
        np.save(root / records.ROI_TOP_PATCH_IDS_FILE, np.zeros((len(roi_rows), 5), np.int32))
        np.save(root / records.ROI_TOP_PATCH_SCORES_FILE, np.zeros((len(roi_rows), 5), np.float32))
    return rows


def _unit_rows(n, dv=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dv))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_record_round_trips_through_json(tmp_path):
    record = _record(0)
    assert Record.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    path = str(tmp_path / "r.jsonl")
    for i in range(3):
        records.append_record(path, _record(i))
    assert records.read_records(path) == [_record(i) for i in range(3)]


@pytest.mark.parametrize("overrides, fragment", [
    (dict(latent_steps=3), "latent_steps=3 != len(reasoning_chain)=2"),
    (dict(question_type="open"), "unknown question_type 'open'"),
    (dict(modality="PET"), "unknown modality 'PET'"),
    (dict(target_type="tissue"), "unknown target_type"),
    (dict(split="dev"), "unknown split"),
    (dict(image="/abs/x.png"), "relative"),
    (dict(reasoning_chain=(), latent_steps=0), "outside 1..4"),
    (dict(roi_index=-2), "roi_index"),
])
def test_record_rejects_contract_violations_naming_the_id(overrides, fragment):
    with pytest.raises(RecordError, match="record 's7'") as e:
        _record(7, **overrides)
    assert fragment in str(e.value)


def test_read_records_names_line_and_id(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(_record(0).to_dict())
    bad = dict(_record(1).to_dict(), latent_steps=4)
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: record 's1'"):
        records.read_records(str(path))
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:3: malformed JSON"):
        records.read_records(str(path))
    path.write_text(good + '\n{"id": "a\tb"}\n')  # a raw tab inside a string: json's message ends in "at"
    with pytest.raises(RecordError, match=r"r\.jsonl:2: malformed JSON \(Invalid control character at column \d+\)"):
        records.read_records(str(path))
    extra = dict(_record(0).to_dict(), colour="red")
    path.write_text(json.dumps(extra) + "\n")
    with pytest.raises(RecordError, match=r"unknown fields \['colour'\]"):
        records.read_records(str(path))
    with pytest.raises(RecordError, match="not found"):
        records.read_records(str(tmp_path / "absent.jsonl"))


def test_a_line_that_is_not_utf8_or_not_an_object_is_named_by_line(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(_record(0).to_dict()).encode("utf-8")
    path.write_bytes(good + b"\n" + good.replace(b"liver", b"liv\xffer", 1) + b"\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: not UTF-8 text \(byte 0xff at column \d+\)"):
        records.read_records(str(path))
    # A JSON string is a line that is not a record, not the text of an error.
    path.write_bytes(good + b"\n" + b'"just a string"\n')
    with pytest.raises(RecordError, match=r"r\.jsonl:2: not a JSON object \(a JSON string\)"):
        records.read_records(str(path))


def test_validate_reports_a_line_that_is_not_utf8_and_goes_on(tmp_path):
    _write_dataset(tmp_path, n=2)
    with open(tmp_path / records.RECORDS_FILE, "ab") as f:
        f.write(b'{"id": "s\xff9"}\n["an", "array"]\n')
    problems = records.validate_dataset(str(tmp_path))
    assert [p.split(records.RECORDS_FILE)[1] for p in problems] == [
        ":3: not UTF-8 text (byte 0xff at column 10)", ":4: not a JSON object (a JSON array)"]


def test_append_after_torn_line_keeps_the_new_record(tmp_path):
    """A crash mid-write leaves a torn last line; the next append must not glue its record onto it."""
    path = tmp_path / "r.jsonl"
    records.append_record(str(path), _record(0))
    with open(path, "a") as f:
        f.write(json.dumps(_record(1).to_dict())[:40])  # torn, no newline
    records.append_record(str(path), _record(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["id"] == "s2"
    with pytest.raises(RecordError, match=r":2: malformed JSON"):
        records.read_records(str(path))


def test_append_is_durable_when_the_writer_is_killed(tmp_path):
    """Each appended record is on disk once append_record returns, even if the process then dies hard."""
    path = tmp_path / "r.jsonl"
    template = json.dumps(_record(0).to_dict())
    code = ("import json, os\nfrom vital_jax.data import records\n"
            f"d = json.loads({template!r})\n"
            f"for i in range(5):\n"
            f"    records.append_record({str(path)!r}, records.Record.from_dict(dict(d, id=f's{{i}}')))\n"
            "os._exit(9)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    assert [r.id for r in records.read_records(str(path))] == [f"s{i}" for i in range(5)]


def test_valid_dataset_has_no_problems(tmp_path):
    _write_dataset(tmp_path, n=3, roi_rows=_unit_rows(3))
    assert records.validate_dataset(str(tmp_path)) == []
    _write_dataset(tmp_path / "pre_roi", n=2)
    assert records.validate_dataset(str(tmp_path / "pre_roi")) == []


def test_validate_reports_every_bad_record_by_id(tmp_path):
    roi = _unit_rows(5)
    roi[1] *= 2.0           # not unit-norm
    roi[2, 0] = np.nan      # non-finite
    rows = _write_dataset(tmp_path, n=5, roi_rows=roi)
    os.remove(tmp_path / "images/img0.png")                                   # s0: missing image
    _mask((5, 5)).save(tmp_path / "masks/img3_liver.png")                     # s3: mask size differs
    (tmp_path / "masks/img4_liver.png").write_bytes(b"not a png")           # s4: corrupt mask
    extra = [dict(rows[0].to_dict(), id="s5", roi_index=9),                   # out of range
             dict(rows[1].to_dict()),                                         # duplicate id s1
             dict(rows[2].to_dict(), id="s6", latent_steps=3),                 # K != len(chain)
             dict(rows[2].to_dict(), id="s8", modality="PET")]                 # unknown modality
    with open(tmp_path / records.RECORDS_FILE, "a") as f:
        for e in extra:
            f.write(json.dumps(e) + "\n")
        f.write("{broken\n")
    problems = records.validate_dataset(str(tmp_path))
    text = "\n".join(problems)
    expected = ["record 's0': image file missing", "record 's1': ROI feature row 1 has norm 2.0000",
                "record 's2': ROI feature row 2 is not finite", "record 's3': mask size (5, 5) != image size",
                "record 's4': mask file unusable", "record 's5': roi_index=9 out of range",
                "record 's1': duplicate id", "record 's6': latent_steps=3 != len(reasoning_chain)=2",
                "record 's8': unknown modality 'PET'", ":10: malformed JSON"]
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not reported in:\n{text}"
    assert "img4_liver.png: corrupt or unreadable mask" in text
    # Plus two repeats: the duplicate s1 has s1's bad ROI row, and s5 names s0's missing image.
    assert len(problems) == len(expected) + 2


def test_a_volume_whose_slices_span_splits_is_refused_naming_the_group_and_splits(tmp_path):
    rows = _write_dataset(tmp_path, n=3)
    sliced = [dataclasses.replace(r, group="case_7", split=split) for r, split in zip(rows, ("train", "train", "test"))]
    records.write_records(str(tmp_path / records.RECORDS_FILE), sliced)
    problems = records.validate_dataset(str(tmp_path))
    assert len(problems) == 1
    assert "group 'case_7' spans splits test (e.g. record 's2'), train (e.g. record 's0')" in problems[0]
    whole = [dataclasses.replace(r, split="test") for r in sliced]
    records.write_records(str(tmp_path / records.RECORDS_FILE), whole)
    assert records.validate_dataset(str(tmp_path)) == []


def test_a_record_written_before_groups_existed_loads_as_its_own_images_group():
    data = _record(0).to_dict()
    assert "group" not in data  # an empty group is not written: such files read as they did before the field
    record = Record.from_dict(data)
    assert record.group == "" and records.split_group(record) == record.image
    grouped = _record(0, group="case_1")
    assert records.split_group(grouped) == "case_1" and Record.from_dict(grouped.to_dict()) == grouped


def test_validate_reports_missing_and_mismatched_roi_arrays(tmp_path):
    _write_dataset(tmp_path, n=2, roi_rows=_unit_rows(2))
    os.remove(tmp_path / records.ROI_TOP_PATCH_SCORES_FILE)
    problems = records.validate_dataset(str(tmp_path))
    assert any("ROI arrays incomplete" in p for p in problems)
    assert any("record 's0': roi_index=0 but the dataset has no ROI arrays" in p for p in problems)
    np.save(tmp_path / records.ROI_TOP_PATCH_SCORES_FILE, np.zeros((3, 5), np.float32))
    assert any("expected float32 (2, 5)" in p for p in records.validate_dataset(str(tmp_path)))


def test_an_interrupted_roi_write_is_refused_by_every_loader_and_reported_once(tmp_path):
    _write_dataset(tmp_path, n=3, roi_rows=_unit_rows(3))
    np.save(tmp_path / records.GLOBAL_FEATURES_FILE, _unit_rows(3, seed=1).astype(np.float32))
    journal = tmp_path / records.ROI_WRITE_JOURNAL
    journal.write_text(json.dumps({"targets": {records.ROI_FEATURES_FILE: ".roi_features.npy.tmp-7",
                                               records.RECORDS_FILE: ".records.jsonl.tmp-7"}}))
    expected = (f"{journal}: an ROI write was interrupted while renaming its files into place, so the ROI arrays, "
                f"roi_features.json and records.jsonl (its roi_index) may come from different runs; rerun python -m "
                f"vital_jax.data.roi --data_dir={tmp_path} --encoder_dir=ENCODER_DIR, which rewrites them all and "
                f"removes the journal")
    for load in (records.load_roi_arrays, records.load_global_features, records.roi_feature_layer):
        with pytest.raises(RecordError) as raised:
            load(str(tmp_path))
        assert str(raised.value) == expected
    # One problem, not a row check per record against arrays that may belong to other records.
    assert records.validate_dataset(str(tmp_path)) == [expected]
    # A journal that lists global_features.npy asks for it again; an unreadable one still refuses.
    journal.write_text(json.dumps({"targets": {records.GLOBAL_FEATURES_FILE: ".global_features.npy.tmp-7"}}))
    assert records.validate_dataset(str(tmp_path)) == [expected.replace("ENCODER_DIR,", "ENCODER_DIR "
                                                                        "--global_features,")]
    journal.write_text('{"targets": ')
    assert records.validate_dataset(str(tmp_path)) == [expected]
    journal.unlink()
    assert records.validate_dataset(str(tmp_path)) == []


def test_validate_checks_the_optional_global_features(tmp_path):
    _write_dataset(tmp_path, n=3, roi_rows=_unit_rows(3))
    np.save(tmp_path / records.GLOBAL_FEATURES_FILE, _unit_rows(3, seed=1).astype(np.float32))
    assert records.validate_dataset(str(tmp_path)) == []
    bad = _unit_rows(3, seed=1).astype(np.float32)
    bad[2] *= 3.0
    np.save(tmp_path / records.GLOBAL_FEATURES_FILE, bad)
    assert any("global_features.npy: 1 row(s) not finite and unit-norm, e.g. rows [2]" in p
               for p in records.validate_dataset(str(tmp_path)))
    np.save(tmp_path / records.GLOBAL_FEATURES_FILE, _unit_rows(2).astype(np.float32))
    assert any("global_features.npy: float32 (2, " in p for p in records.validate_dataset(str(tmp_path)))


def test_validate_cli_exit_codes(tmp_path):
    _write_dataset(tmp_path, n=2)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ok = subprocess.run([sys.executable, "-m", "vital_jax.data.validate", f"--data_dir={tmp_path}"], cwd=root,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "2 valid records" in ok.stdout, ok.stderr
    os.remove(tmp_path / "masks/img1_liver.png")
    bad = subprocess.run([sys.executable, "-m", "vital_jax.data.validate", f"--data_dir={tmp_path}"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "record 's1': mask file missing" in bad.stdout
