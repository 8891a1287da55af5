"""Dataset build end to end: shared BiomedParse demo and phantoms -> questions -> geometry teacher -> validated
records; determinism, resumption, MSD, and errors that name the stage or file."""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.medical_files import dicom_affine_ras, write_dicom_series, write_nifti
from vital_jax import workdir
from vital_jax.data import build, build_inputs, quality_gate, questions, records, teacher
from vital_jax.data.build_config import default_config
from vital_jax.data.ingest import IngestError
from vital_jax.data.records import QUESTION_TYPES, STEP_RANGES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _phantom_config(out_dir, count=3, size=96, seed=0):
    config = default_config()
    config.out_dir = str(out_dir)
    config.phantoms.count, config.phantoms.size, config.seed = count, size, seed
    return config


def test_shared_biomedparse_demo_builds_validated_records(shared_data_dir, tmp_path):
    root = os.path.join(shared_data_dir, "biomedparse_demo")
    config = default_config()
    config.out_dir = str(tmp_path / "demo")
    config.source = "biomedparse"
    config.biomedparse.image_dir = os.path.join(root, "demo")
    config.biomedparse.mask_dir = os.path.join(root, "demo_mask")
    result = build.build(config)
    assert records.validate_dataset(config.out_dir) == []
    rows = records.read_records(os.path.join(config.out_dir, records.RECORDS_FILE))
    assert result["questions"] == result["records"] == len(rows)
    # Every target is asked every question type but one: the glandular structure's four regions lie in different
    # thirds both across and down the image, so no location choice has a single right answer. Identify questions
    # are asked only where no other target of the image has the same kind and place (one question, one answer).
    per_type = collections.Counter(r.question_type for r in rows)
    assert {t: n for t, n in per_type.items() if t != "identify"} == {
        t: 62 - (t == "location_choice") for t in QUESTION_TYPES if t != "identify"}
    identify = [(r.image, r.question.replace("Which organ can be seen", "What organ is shown").replace(
        "Which abnormality can be seen", "What abnormality is shown").replace(
        "Which structure can be seen", "What structure is shown")) for r in rows if r.question_type == "identify"]
    assert 0 < len(identify) < 62 and len(set(identify)) == len(identify)
    assert not [r for r in rows if r.target == "glandular structure" and r.question_type == "location_choice"]
    assert {r.modality for r in rows} == {"CT", "MRI", "X-Ray", "pathology", "ultrasound", "fundus", "endoscope",
                                         "dermoscopy"}
    split_of_image = collections.defaultdict(set)
    for r in rows:
        split_of_image[r.image].add(r.split)
        low, high = STEP_RANGES[r.question_type]
        assert low <= r.latent_steps == len(r.reasoning_chain) <= high and r.roi_index == -1
        # Every stored record is a fixed point of the gate (already normalised, leakage-free).
        context = quality_gate.GateContext(r.question_type, r.target, r.target_type, False,
                                           ("left", "right", "center") if "left, right" in r.question else
                                           ("upper", "middle", "lower"), r.modality)
        out = quality_gate.check({"final_answer": r.answer, "reasoning_chain": list(r.reasoning_chain)}, context)
        assert out.accepted and out.output.final_answer == r.answer, (r.id, out.violation)
    assert all(len(s) == 1 for s in split_of_image.values()) and len(split_of_image) == 21
    assert {s for r in rows for s in [r.split]} == {"train", "val", "test"}
    image = Image.open(os.path.join(config.out_dir, rows[0].image))
    assert image.mode == "RGB" and image.size == (1024, 1024)
    # Location answers name the image-space third of each separate region's centroid, computed here straight from
    # the file (a single region: exactly that third; several: each region's third is named).
    for r in (r for r in rows if r.question_type == "location"):
        mask = np.asarray(Image.open(os.path.join(config.out_dir, r.mask))) > 0
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        keep = [i + 1 for i in range(count) if sizes[i] >= min(0.05 * sizes.sum(), 0.2 * sizes.max())]
        centres = ndimage.center_of_mass(mask, labels, keep) if len(keep) > 1 else [np.argwhere(mask).mean(0)]
        expected = []
        for row, col in centres:
            v = ("upper", "middle", "lower")[min(int(3 * (row + 0.5) / mask.shape[0]), 2)]
            h = ("left", "center", "right")[min(int(3 * (col + 0.5) / mask.shape[1]), 2)]
            words = {"middle": "", "center": ""}
            core = " ".join(w for w in (words.get(v, v), words.get(h, h)) if w) or "central"
            expected.append({"upper": "upper central", "lower": "lower central"}.get(core, core))
        if len(centres) == 1:
            assert r.answer == f"The {r.target} is located in the {expected[0]} part of the image.", r.id
        elif len(centres) < 4:
            assert all(f" {core} " in r.answer for core in expected) and "parts of the image" in r.answer or (
                len(set(expected)) == 1 and f"the {expected[0]} part of the image" in r.answer), (r.id, r.answer)
        else:  # scattered: the largest region's place is named
            largest = expected[int(np.argmax([sizes[k - 1] for k in keep]))]
            assert "scattered" in r.answer and f"the largest in the {largest} part" in r.answer, r.answer


def test_demo_config_cli_builds_and_a_rerun_changes_nothing(tmp_path):
    out = tmp_path / "phantoms"
    command = [sys.executable, "-m", "vital_jax.data.build", "--config=configs/data/demo_phantoms.py",
               f"--config.out_dir={out}", "--config.phantoms.count=3", "--config.phantoms.size=96"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[0])
    assert summary["records"] > 0 and set(summary["splits"]) == {"train", "val", "test"}
    before = (out / records.RECORDS_FILE).read_bytes()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and f"{summary['records']} already done" in second.stdout
    assert (out / records.RECORDS_FILE).read_bytes() == before
    check = subprocess.run([sys.executable, "-m", "vital_jax.data.validate", f"--data_dir={out}"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout


def test_builds_are_deterministic_under_the_seed(tmp_path):
    a = build.build(_phantom_config(tmp_path / "a"))
    b = build.build(_phantom_config(tmp_path / "b"))
    build.build(_phantom_config(tmp_path / "c", seed=1))
    read = lambda d: (tmp_path / d / records.RECORDS_FILE).read_text()  # noqa: E731
    assert a["records"] == b["records"] and read("a") == read("b") != read("c")


def test_an_interrupted_teacher_stage_is_finished_by_a_rerun(tmp_path):
    config = _phantom_config(tmp_path / "x")
    build.build(config)
    path = tmp_path / "x" / records.RECORDS_FILE
    full = path.read_text().splitlines()
    path.write_text("\n".join(full[:7]) + "\n" + full[7][:30])  # 7 records kept, one torn mid-line
    result = build.build(config)
    assert result["distill"]["skipped_finished"] == 7 and path.read_text().splitlines() == full


def _msd_task(task, name: str, modality: str, labels: dict, cases: dict):
    """An MSD task folder: dataset.json (`labels`: value -> name) and, per case name, its (image, label) volumes;
    returns the build config that reads it into tmp_path/out (beside the task)."""
    os.makedirs(task / "imagesTr")
    os.makedirs(task / "labelsTr")
    training = []
    for case, (image, label) in cases.items():
        write_nifti(str(task / f"imagesTr/{case}.nii.gz"), image)
        write_nifti(str(task / f"labelsTr/{case}.nii.gz"), label)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": name, "modality": {"0": modality},
                                                   "labels": {"0": "background", **labels}, "training": training}))
    config = default_config()
    config.out_dir, config.source, config.msd.task_dir = str(task.parent / "out"), "msd", str(task)
    return config


def test_msd_task_builds(tmp_path):
    hu = np.full((48, 48, 4), -100, np.int16)
    label = np.zeros((48, 48, 4), np.uint8)
    label[10:30, 12:28, 1:3] = 1
    hu[label == 1] = 60
    config = _msd_task(tmp_path / "Task09_Spleen", "Spleen", "CT", {"1": "spleen"}, {"spleen_1": (hu, label)})
    result = build.build(config)
    rows = records.read_records(str(tmp_path / "out" / records.RECORDS_FILE))
    assert result["records"] == 2 * len(QUESTION_TYPES)
    assert {r.source for r in rows} == {"MSD Spleen"} and {r.target_type for r in rows} == {"organ"}
    asked = questions.read_questions(str(tmp_path / "out" / questions.QUESTIONS_FILE))
    assert all(q.normal_anatomy for q in asked)


def test_every_msd_case_lands_in_one_split_with_its_group_recorded(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for c in range(6):  # 8 near-identical slices per case
        label = np.zeros((64, 64, 12), np.uint8)
        label[10 + c:40 + c, 20:50, 2:10] = 1
        cases[f"case_{c}"] = (rng.normal(40, 30, label.shape).astype(np.float32), label)
    build.build(_msd_task(tmp_path / "Task09_Spleen", "Spleen", "CT", {"1": "spleen"}, cases))
    splits_of = collections.defaultdict(set)
    for row in records.read_records(str(tmp_path / "out" / records.RECORDS_FILE)):
        assert row.image.startswith(f"images/{row.group}_z")
        splits_of[row.group].add(row.split)
    assert sorted(splits_of) == [f"case_{c}" for c in range(6)]
    assert all(len(s) == 1 for s in splits_of.values())
    assert {s for (s,) in splits_of.values()} == set(records.SPLITS)


def test_msd_target_names_rename_a_label_in_the_questions_and_its_target_type(tmp_path):
    task = tmp_path / "Task04_Hippocampus"
    label = np.zeros((48, 48, 2), np.uint8)
    label[10:30, 12:28, :] = 1
    config = _msd_task(task, "Hippocampus", "MRI", {"1": "Anterior"},
                       {"hippocampus_1": (np.where(label == 1, 300, 100).astype(np.int16), label)})
    config.msd.target_names = {"Anterior": "anterior hippocampus"}
    build.check_config(config)
    os.makedirs(config.out_dir)
    asked = build.prepare(config)
    assert {q.target for q in asked} == {"anterior hippocampus"}
    assert all(q.target_type == "organ" and q.normal_anatomy for q in asked)  # the pathology filter applies
    assert any("anterior hippocampus" in q.question for q in asked)
    config.msd.target_names = {"anterior": "anterior hippocampus"}
    with pytest.raises(build.BuildError, match=r"renames \['anterior'\], which .*dataset.json does not name "
                                               r"\(its label names: \['Anterior'\]\)"):
        build.check_config(config)


def test_dicom_source_builds(tmp_path):
    hu = np.full((4, 48, 48), -100, np.int16)  # (slices, rows, columns)
    hu[1:3, 10:30, 12:28] = 60
    write_dicom_series(str(tmp_path / "src/images/p1"), hu, window=([40.0], [400.0]))
    label = (hu.transpose(2, 1, 0) == 60).astype(np.uint8)  # in DICOM's (column, row, slice) voxel order
    os.makedirs(tmp_path / "src/labels")
    write_nifti(str(tmp_path / "src/labels/p1.nii.gz"), label, dicom_affine_ras((0.0, 0.0, 0.0)))
    config = default_config()
    config.out_dir, config.source, config.dicom.root = str(tmp_path / "out"), "dicom", str(tmp_path / "src")
    config.dicom.labels, config.dicom.name = {"1": "spleen"}, "Spleen CT"
    result = build.build(config)
    rows = records.read_records(str(tmp_path / "out" / records.RECORDS_FILE))
    assert result["records"] == 2 * len(QUESTION_TYPES)
    assert {r.source for r in rows} == {"DICOM Spleen CT"} and {r.image for r in rows} == {
        "images/p1_z001.png", "images/p1_z002.png"}


def test_errors_name_the_stage_or_file(tmp_path):
    config = _phantom_config(tmp_path / "e")
    config.source = "nrrd"
    with pytest.raises(build.BuildError, match="config.source='nrrd'"):
        build.build(config)
    config.source = "dicom"
    with pytest.raises(build.BuildError, match="needs dicom.root"):
        build.build(config)
    config = _phantom_config(tmp_path / "r")
    config.roi.enabled = True
    with pytest.raises(build.BuildError, match="roi.encoder_dir"):
        build.build(config)
    config = default_config()
    with pytest.raises(build.BuildError, match="out_dir is empty"):
        build.build(config)
    image_dir, mask_dir = tmp_path / "bp", tmp_path / "bp_mask"
    os.makedirs(image_dir)
    os.makedirs(mask_dir)
    Image.new("RGB", (16, 16)).save(image_dir / "a_CT_liver.png")
    Image.new("L", (16, 16)).save(mask_dir / "a_CT_liver_liver.png")
    config.out_dir, config.source = str(tmp_path / "bp_out"), "biomedparse"
    config.biomedparse.image_dir, config.biomedparse.mask_dir = str(image_dir), str(mask_dir)
    with pytest.raises(IngestError, match="a_CT_liver_liver.png: empty mask"):
        build.build(config)


@pytest.mark.parametrize("field, value, message", [
    ("teacher.kind", "gpt", r"config\.teacher\.kind='gpt': expected 'geometry' or 'api'"),
    ("split_fractions", (0.5, 0.6, 0.1), r"config\.split_fractions=\(0\.5, 0\.6, 0\.1\): expected 3 non-negative"),
    ("question_types", ["yes_no", "why"], r"config\.question_types: unknown \['why'\]"),
    ("phantoms.layout", "spiral", r"config\.phantoms\.layout='spiral'"),
    ("roi.enabled", True, r"roi\.encoder_dir"),
    # The client appends /chat/completions to base_url: a query would come before it (and hold a key, not shown).
    ("teacher.base_url", "https://api.example.com/v1?key=sk-secret",
     r"base_url=https://api\.example\.com/v1\?\*\*\*: expected the API's base URL"),
    ("teacher.base_url", "api.example.com/v1", r"base_url=<not a URL>: expected the API's base URL"),
])
def test_a_bad_config_value_stops_the_build_before_anything_is_written(tmp_path, field, value, message):
    config = _phantom_config(tmp_path / "x")
    if field == "teacher.base_url":
        config.teacher.kind, config.teacher.model = "api", "m"
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(build.BuildError, match=message):
        build.build(config)
    assert not (tmp_path / "x").exists()


def test_the_command_reports_bad_input_without_a_traceback(tmp_path, monkeypatch, capsys):
    config = _phantom_config(tmp_path / "x")
    config.split_fractions = (0.5, 0.6, 0.1)
    monkeypatch.setattr(build, "_CONFIG", type("Flag", (), {"value": config}), raising=False)
    assert build.main([]) == 1
    assert capsys.readouterr().err.startswith("error: config.split_fractions=(0.5, 0.6, 0.1)")
    config.split_fractions = (0.8, 0.1, 0.1)
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / build_inputs.INPUTS_FILE).write_text('{"version": 1, "con')  # a ValueError subclass
    assert build.main([]) == 1
    assert "build_inputs.json: malformed JSON" in capsys.readouterr().err


def test_a_second_build_of_a_busy_out_dir_is_refused_and_the_command_says_so_in_one_line(tmp_path, monkeypatch,
                                                                                         capsys):
    """Two builds of one out_dir at once both asked the teacher every question and appended every record twice."""
    config = _phantom_config(tmp_path / "x")
    build.build(config)
    lock = tmp_path / "x" / workdir.LOCK_FILE
    assert not lock.exists()  # released on the way out
    built = (tmp_path / "x" / records.RECORDS_FILE).read_text()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": running.pid, "since": "2025-01-01 00:00:00"}))
        with pytest.raises(workdir.WorkdirInUseError, match=f"{tmp_path / 'x'} is in use by another run \\(pid "
                                                            f"{running.pid}"):
            build.build(config)
        monkeypatch.setattr(build, "_CONFIG", type("Flag", (), {"value": config}), raising=False)
        assert build.main([]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'x'} is in use by another run") and err.count("\n") == 1
        assert "use another --config.out_dir" in err  # the build's setting, not a --workdir it has none of
    finally:
        running.kill()
        running.wait()
    assert (tmp_path / "x" / records.RECORDS_FILE).read_text() == built
    # A build inside a folder whose lock this process holds (the demo's data under the training run's workdir).
    with workdir.WorkdirLock(str(tmp_path)):
        assert build.build(_phantom_config(tmp_path / "nested"))["records"] == len(built.splitlines())


def test_an_out_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "data").write_text("my notes")
    with pytest.raises(build.BuildError, match=r"config\.out_dir='.*/data' is a file, not a folder"):
        build.build(_phantom_config(tmp_path / "data"))
    with pytest.raises(build.BuildError, match=r"config\.out_dir='.*/data/x': cannot create the folder"):
        build.build(_phantom_config(tmp_path / "data" / "x"))
    assert (tmp_path / "data").read_text() == "my notes"


def test_a_build_that_never_finished_its_first_stage_is_built_over_with_other_inputs(tmp_path, caplog):
    build.check_inputs(_phantom_config(tmp_path / "x"))       # as if stage 1 of this build had been interrupted
    os.makedirs(tmp_path / "x" / "images")
    Image.new("RGB", (16, 16)).save(tmp_path / "x" / "images" / "left_over.png")
    with caplog.at_level(logging.WARNING):
        result = build.build(_phantom_config(tmp_path / "x", seed=1))
    assert "an unfinished build (no questions.jsonl yet) from other inputs (config.seed: 0 -> 1)" in caplog.text
    assert result["records"] > 0 and (tmp_path / "x" / "images" / "left_over.png").exists()  # nothing deleted
    with pytest.raises(build.BuildError, match=r"built from other inputs.*config\.seed: 1 -> 0"):  # finished: refused
        build.build(_phantom_config(tmp_path / "x"))


def _biomedparse_source(tmp_path, masks: dict[str, list[str]], size=32):
    """A BiomedParse-layout folder pair: image stem -> mask file names (target part, with suffix), each mask a
    different square so that no two are alike."""
    image_dir, mask_dir = tmp_path / "src", tmp_path / "src_mask"
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for n, (stem, targets) in enumerate(masks.items()):
        Image.fromarray(np.full((size, size, 3), 40 + 20 * n, np.uint8)).save(image_dir / f"{stem}.png")
        for k, target in enumerate(targets):
            mask = np.zeros((size, size), np.uint8)
            mask[2 + 3 * k:8 + 3 * k, 4 + 4 * k:12 + 4 * k] = 255
            Image.fromarray(mask).save(mask_dir / f"{stem}_{target}")
    config = default_config()
    config.out_dir, config.source = str(tmp_path / "out"), "biomedparse"
    config.biomedparse.image_dir, config.biomedparse.mask_dir = str(image_dir), str(mask_dir)
    return config


def test_target_names_that_normalise_alike_get_distinct_question_ids(tmp_path):
    # "left kidney" (left+kidney) and "left-kidney" both slug to left-kidney.
    config = _biomedparse_source(tmp_path, {"a_CT_abdomen": ["left+kidney.png", "left-kidney.png", "liver.png"]})
    result = build.build(config)
    rows = records.read_records(os.path.join(config.out_dir, records.RECORDS_FILE))
    assert result["records"] == len(rows) == 3 * len(QUESTION_TYPES) and len({r.id for r in rows}) == len(rows)
    assert {r.id for r in rows if r.question_type == "yes_no"} == {
        "a_CT_abdomen__left-kidney-1__yes_no", "a_CT_abdomen__left-kidney-2__yes_no", "a_CT_abdomen__liver__yes_no"}
    assert {r.target for r in rows} == {"left kidney", "left-kidney", "liver"}
    assert questions.target_keys(["left-kidney", "left kidney"]) == questions.target_keys(["left kidney",
                                                                                          "left-kidney"])


def test_a_duplicate_question_id_stops_the_question_stage_naming_both_sources(tmp_path):
    # Two mask files for one target of one image: both would ask the same questions under the same ids.
    config = _biomedparse_source(tmp_path, {"a_CT_abdomen": ["liver.bmp", "liver.png"]})
    with pytest.raises(build.BuildError, match=r"question id 'a_CT_abdomen__liver__yes_no' is made twice") as e:
        build.build(config)
    assert "a_CT_abdomen_liver.bmp" in str(e.value) and "a_CT_abdomen_liver.png" in str(e.value)
    assert not os.path.exists(os.path.join(config.out_dir, questions.QUESTIONS_FILE))


def test_other_inputs_in_a_built_folder_are_refused_naming_the_change_or_rebuilt(tmp_path, caplog):
    config = _phantom_config(tmp_path / "x")
    first = build.build(config)
    path = tmp_path / "x" / records.RECORDS_FILE
    built = path.read_text()
    # The same build again resumes: every stage is reused.
    again = build.build(_phantom_config(tmp_path / "x"))
    assert again["distill"]["skipped_finished"] == first["questions"] and path.read_text() == built
    changed = _phantom_config(tmp_path / "x", seed=1)
    with pytest.raises(build.BuildError, match=r"built from other inputs.*config\.seed: 0 -> 1.*on_change=rebuild"):
        build.build(changed)
    assert path.read_text() == built  # refused before touching anything
    inputs = (tmp_path / "x" / build_inputs.INPUTS_FILE).read_text()
    images = sorted(os.listdir(tmp_path / "x" / "images"))
    changed.on_change = "rebuild"
    with caplog.at_level(logging.WARNING):
        build.build(changed)
    build.build(_phantom_config(tmp_path / "fresh", seed=1))
    assert path.read_text() == (tmp_path / "fresh" / records.RECORDS_FILE).read_text() != built
    # The replaced outputs (the teacher's answers may have been paid for) are moved aside, not deleted.
    [aside] = [n for n in os.listdir(tmp_path / "x") if n.startswith(build.REPLACED_PREFIX)]
    assert f"moved the old outputs into {tmp_path / 'x' / aside}" in caplog.text
    assert (tmp_path / "x" / aside / records.RECORDS_FILE).read_text() == built
    assert (tmp_path / "x" / aside / build_inputs.INPUTS_FILE).read_text() == inputs
    assert sorted(os.listdir(tmp_path / "x" / aside / "images")) == images
    config.on_change = "rebuild"  # back to the first inputs, within the same second or not: another folder
    assert build.build(config)["records"] == first["records"] and path.read_text() == built
    assert len([n for n in os.listdir(tmp_path / "x") if n.startswith(build.REPLACED_PREFIX)]) == 2


def test_a_truncated_build_inputs_file_is_named_and_the_outputs_are_kept(tmp_path):
    config = _phantom_config(tmp_path / "x")
    build.build(config)
    inputs = tmp_path / "x" / build_inputs.INPUTS_FILE
    inputs.write_text(inputs.read_text()[:40])
    built = (tmp_path / "x" / records.RECORDS_FILE).read_text()
    with pytest.raises(build_inputs.InputsError, match=r"build_inputs\.json: malformed JSON: .*delete it to reuse"):
        build.build(config)
    inputs.write_text("[]")
    with pytest.raises(build_inputs.InputsError, match=r"build_inputs\.json: expected a JSON object"):
        build.build(config)
    assert (tmp_path / "x" / records.RECORDS_FILE).read_text() == built


def test_a_changed_source_file_is_refused_naming_it_and_a_touched_one_is_not(tmp_path):
    config = _biomedparse_source(tmp_path, {"a_CT_abdomen": ["liver.png"], "b_MRI_brain": ["tumor.png"]})
    build.build(config)
    mask = tmp_path / "src_mask" / "b_MRI_brain_tumor.png"
    os.utime(mask, ns=(1, 1))  # same content, other mtime: still the same build
    assert build.build(config)["distill"]["skipped_finished"] == 2 * len(QUESTION_TYPES)
    values = np.zeros((32, 32), np.uint8)
    values[10:20, 10:20] = 255
    Image.fromarray(values).save(mask)
    Image.new("RGB", (32, 32)).save(tmp_path / "src" / "c_CT_chest.png")
    with pytest.raises(build.BuildError, match=r"files of config\.biomedparse\.image_dir: 1 added \(c_CT_chest\.png\)"
                                               r"; files of config\.biomedparse\.mask_dir: 1 changed "
                                               r"\(b_MRI_brain_tumor\.png\)"):
        build.build(config)


def test_a_small_dataset_has_an_image_in_every_split_it_can_fill_and_an_empty_split_is_warned(tmp_path, caplog):
    # Every image its own modality: no stratum is shared, which once sent all six images to train.
    stems = ["a_CT_x", "b_MRI_x", "c_ultrasound_x", "d_X-Ray_x", "e_pathology_x", "f_fundus_x"]
    config = _biomedparse_source(tmp_path, {stem: ["liver.png"] for stem in stems})
    build.build(config)
    rows = records.read_records(os.path.join(config.out_dir, records.RECORDS_FILE))
    split_of = collections.defaultdict(set)
    for r in rows:
        split_of[r.image].add(r.split)
    assert all(len(s) == 1 for s in split_of.values())  # split by image: none crosses splits
    assert collections.Counter(s for (s,) in split_of.values()) == {"train": 4, "val": 1, "test": 1}
    with caplog.at_level(logging.WARNING):
        result = build.build(_phantom_config(tmp_path / "two", count=2))
    assert result["splits"]["test"] == 0 and result["splits"]["val"] > 0
    assert "split 'test' is empty (2 volume(s) or image(s) in all" in caplog.text


def test_a_build_without_its_teacher_api_key_stops_with_one_error_line(tmp_path):
    """Each question failed in turn (a warning each, logged unfinished) and the build went on to an empty split."""
    env = {k: v for k, v in os.environ.items() if k != "VITAL_TEST_NO_SUCH_KEY"}
    res = subprocess.run([sys.executable, "-m", "vital_jax.data.build", "--config=configs/data/demo_phantoms.py",
                          f"--config.out_dir={tmp_path / 'out'}", "--config.phantoms.count=3",
                          "--config.phantoms.size=96", "--config.teacher.kind=api", "--config.teacher.model=m",
                          "--config.teacher.base_url=http://127.0.0.1:9/v1",
                          "--config.teacher.api_key_env=VITAL_TEST_NO_SUCH_KEY"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "error: environment variable VITAL_TEST_NO_SUCH_KEY is not set" in res.stderr
    assert "a rerun will retry it" not in res.stderr


def test_the_api_teachers_sampling_is_a_build_input_and_older_records_without_it_still_match(tmp_path):
    config = _phantom_config(tmp_path / "x")
    recorded = build_inputs.fingerprint(config)
    assert "teacher.temperature" not in recorded["config"]          # the offline teacher does not sample
    config.teacher.kind, config.teacher.model, config.teacher.base_url = "api", "m", "https://api.example.com/v1"
    api = build_inputs.fingerprint(config)
    older = {**api, "config": {k: v for k, v in api["config"].items() if k not in ("teacher.temperature",
                                                                                  "teacher.max_tokens")}}
    assert build_inputs.differences(older, api) == []               # written before the fields existed: same build
    config.teacher.temperature, config.teacher.max_requests = 0.7, 50
    (change,) = build_inputs.differences(older, build_inputs.fingerprint(config))   # the budget is not an input
    assert change == "config.teacher.temperature: '<unset>' -> 0.7"


def test_a_teacher_dry_run_writes_the_prompts_and_bounds_the_requests_asking_nothing(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vital_jax.data.build", "--config=configs/data/demo_phantoms.py",
               f"--config.out_dir={out}", "--config.phantoms.count=3", "--config.phantoms.size=96",
               "--config.teacher.kind=api", "--config.teacher.model=m",
               "--config.teacher.base_url=http://127.0.0.1:9/v1", "--config.teacher.api_key_env=VITAL_TEST_NO_SUCH_KEY",
               "--config.teacher.max_retries=2"]
    res = subprocess.run(command + ["--config.teacher.dry_run=True"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "VITAL_TEST_NO_SUCH_KEY"})
    assert res.returncode == 0, res.stderr[-3000:]
    prompts = [json.loads(line) for line in open(out / teacher.DRY_RUN_FILE)]
    n = len(prompts)
    assert n > 0 and f"teacher dry run: {n} question(s) to ask (0 already done), {n} to {n * 5 * 3} requests" \
        in res.stdout
    assert all(p["user_prompt"].startswith("Target (teacher-only") for p in prompts)
    assert not (out / records.RECORDS_FILE).exists()           # nothing was asked, nothing answered
    # The dry run is not a build input: the real build that follows is the same build (refused here for its key).
    res = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "VITAL_TEST_NO_SUCH_KEY"})
    assert res.returncode == 1 and "VITAL_TEST_NO_SUCH_KEY is not set" in res.stderr, res.stderr[-3000:]


def test_credentials_in_the_teachers_url_are_never_recorded_and_a_change_of_them_is_seen(tmp_path):
    config = _phantom_config(tmp_path / "x")
    config.teacher.kind, config.teacher.model = "api", "m"
    config.teacher.base_url = "https://user:sk-secret@api.example.com/v1?key=sk-other"
    recorded = build_inputs.fingerprint(config)
    text = json.dumps(recorded)
    assert "sk-secret" not in text and "sk-other" not in text and "user" not in text
    assert recorded["config"]["teacher.base_url"].startswith("https://***@api.example.com/v1?***")
    config.teacher.base_url = "https://user:sk-changed@api.example.com/v1?key=sk-other"
    (change,) = build_inputs.differences(recorded, build_inputs.fingerprint(config))
    assert change.startswith("config.teacher.base_url:") and "sk-changed" not in change
    config.teacher.base_url = "https://api.example.com/v1"  # nothing to hide: recorded as it is
    assert build_inputs.fingerprint(config)["config"]["teacher.base_url"] == "https://api.example.com/v1"


def test_a_question_that_several_targets_of_an_image_answer_is_not_asked(tmp_path, caplog):
    """'What organ is shown in the upper left part ...?' about each of two organs there: one input, two gold
    answers (and each the other's distractor in a multiple-choice evaluation). A target alone in its part of the
    image keeps its identify question; the two overlapping ones keep every other question."""
    image_dir, mask_dir = tmp_path / "src", tmp_path / "src_mask"
    os.makedirs(image_dir)
    os.makedirs(mask_dir)
    Image.fromarray(np.full((48, 48, 3), 60, np.uint8)).save(image_dir / "a_CT_abdomen.png")
    for name, (rows, cols) in {"liver": ((2, 12), (2, 12)), "spleen": ((4, 14), (3, 13)),
                               "bladder": ((36, 46), (34, 46))}.items():
        mask = np.zeros((48, 48), np.uint8)
        mask[slice(*rows), slice(*cols)] = 255
        Image.fromarray(mask).save(mask_dir / f"a_CT_abdomen_{name}.png")
    config = default_config()
    config.out_dir, config.source = str(tmp_path / "out"), "biomedparse"
    config.biomedparse.image_dir, config.biomedparse.mask_dir = str(image_dir), str(mask_dir)
    with caplog.at_level(logging.WARNING):
        build.build(config)
    rows = records.read_records(os.path.join(config.out_dir, records.RECORDS_FILE))
    identify = {r.target for r in rows if r.question_type == "identify"}
    assert identify == {"bladder"}, identify
    assert all({r.question_type for r in rows if r.target == t} == set(QUESTION_TYPES) - {"identify"}
               for t in ("liver", "spleen"))
    assert "left out 2 question(s) that other targets of their image answer too" in caplog.text
