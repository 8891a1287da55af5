"""Hugging Face Hub copies of VQA-RAD, SLAKE, PathVQA and PMC-VQA (parquet / save_to_disk arrow) read into the same
examples as the original releases; corrupt images and missing columns are named by file and row."""

import csv
import dataclasses
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vital_jax.eval import hf_files, metrics
from vital_jax.eval.benchmarks import BenchmarkError, load_benchmark


@pytest.fixture(autouse=True)
def _image_cache(tmp_path, monkeypatch):
    """Images from the tables go to a cache under tmp_path, never to ~/.cache."""
    monkeypatch.setenv("VITAL_JAX_CACHE", str(tmp_path / "cache"))


def _png(color=(10, 20, 30), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(size=32) -> bytes:
    """A PNG whose pixel data is most of the file, so that cutting it keeps a readable header."""
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_image(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _write_arrow_stream(path, rows):
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def _write_arrow_file(path, rows):
    """The Arrow IPC file format (random access), which some tools write instead of the stream format."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _hub_image(data: bytes, name=None) -> dict:
    """The Hub's Image feature as stored in parquet: a struct of bytes and path."""
    return {"bytes": data, "path": name}


def _without_image(examples, *extra_keys):
    return [dataclasses.replace(e, image="", extra={k: v for k, v in e.extra.items() if k not in extra_keys})
            for e in examples]


def _same_pixels(path_a, path_b):
    with Image.open(path_a) as a, Image.open(path_b) as b:
        return a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


# -------------------------------------------------------------------------------------------------------- VQA-RAD

def _shared_vqa_rad(shared_data_dir):
    data_dir = os.path.join(shared_data_dir, "vqa_rad")
    with open(os.path.join(data_dir, "testset.json"), encoding="utf-8") as f:
        return data_dir, json.load(f)


def _image_bytes(data_dir, name):
    with open(os.path.join(data_dir, "images", name), "rb") as f:
        return f.read()


def test_vqa_rad_hub_copy_of_the_shared_test_split_reads_like_the_release(shared_data_dir, tmp_path):
    """flaviagiammarino/vqa-rad's layout (image bytes, question, answer; no answer_type): the same 451 questions
    and answers as testset.json, closed exactly where the answer is yes/no, every image byte for byte."""
    data_dir, raw = _shared_vqa_rad(shared_data_dir)
    rows = [{"image": _hub_image(_image_bytes(data_dir, r["image_name"])), "question": r["question"],
             "answer": str(r["answer"])} for r in raw]
    _write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001-e5bc3d208bb4deeb.parquet", rows)
    hub = load_benchmark("vqa_rad", str(tmp_path / "hub"))
    release = load_benchmark("vqa_rad", data_dir)
    assert [(e.question, e.answer) for e in hub] == [(e.question, e.answer) for e in release]
    assert [e.id for e in hub[:2]] == ["test_0", "test_1"]
    assert [e.answer_type == "closed" for e in hub] == [metrics.is_yes_no(e.answer) for e in release]
    assert sum(e.answer_type == "closed" for e in hub) == 251          # the release's CLOSED type has 272
    # Every yes/no question of the release is CLOSED, so the two agree wherever the Hub copy says closed.
    assert all(r.answer_type == "closed" for h, r in zip(hub, release) if h.answer_type == "closed")
    assert {e.match for e in hub} == {"vqa", "f1"}
    for h, r in zip(hub, release):
        with open(h.image, "rb") as a, open(r.image, "rb") as b:
            assert a.read() == b.read()
    assert len({e.image for e in hub}) == len({e.image for e in release}) == 203   # one file per distinct image
    assert all(e.image.startswith(str(tmp_path / "cache" / "benchmark_images")) for e in hub)


def test_vqa_rad_hub_copy_with_the_release_columns_gives_the_release_examples(shared_data_dir, tmp_path):
    data_dir, raw = _shared_vqa_rad(shared_data_dir)
    raw = raw[:40]
    rows = [{**r, "answer": str(r["answer"]), "image_name": _hub_image(_image_bytes(data_dir, r["image_name"]),
                                                                       r["image_name"])} for r in raw]
    _write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", rows)
    hub = load_benchmark("vqa_rad", str(tmp_path / "hub"))
    release = load_benchmark("vqa_rad", data_dir, limit=40)
    assert _without_image(hub) == _without_image(release)
    assert all(_same_pixels(h.image, r.image) for h, r in zip(hub[:5], release[:5]))


def test_limit_reads_no_further_than_it_needs(tmp_path):
    rows = [{"image": _hub_image(_png()), "question": "Is it?", "answer": "yes"},
            {"image": _hub_image(b"not an image"), "question": "Is it?", "answer": "no"}]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    assert len(load_benchmark("vqa_rad", str(tmp_path), limit=1)) == 1
    with pytest.raises(BenchmarkError, match="row 1"):
        load_benchmark("vqa_rad", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------- SLAKE

SLAKE_ROWS = [
    {"qid": 11, "img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT? ", "answer": "Yes",
     "answer_type": "CLOSED", "q_lang": "en", "content_type": "Modality", "base_type": "vqa", "modality": "CT",
     "location": "Abdomen"},
    {"qid": 12, "img_id": 1, "img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是",
     "answer_type": "CLOSED", "q_lang": "zh", "content_type": "Modality", "base_type": "vqa", "modality": "CT",
     "location": "Abdomen"},
    {"qid": 13, "img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Which organ is abnormal?",
     "answer": "Liver", "answer_type": "OPEN", "q_lang": "en", "content_type": "Abnormality", "base_type": "vqa",
     "modality": "MRI", "location": "Abdomen"},
]


def _slake_release(tmp_path, json_name="validate.json"):
    release = tmp_path / "release"
    images = {"xmlab1/source.jpg": _png((200, 0, 0)), "xmlab2/source.jpg": _png((0, 200, 0))}
    for name, data in images.items():
        _save_image(release / "imgs" / name, data)
    _write_json(release / json_name, SLAKE_ROWS)
    return str(release), images


@pytest.mark.parametrize("image_column", ["bytes", "img_name"])
def test_slake_hub_copy_reads_like_the_release(tmp_path, image_column):
    release_dir, images = _slake_release(tmp_path)
    hub = tmp_path / "hub"
    if image_column == "bytes":
        rows = [{**{k: v for k, v in r.items() if k != "img_name"}, "image": _hub_image(images[r["img_name"]])}
                for r in SLAKE_ROWS]
    else:                                        # the table names the image; the image folder sits beside it
        rows = SLAKE_ROWS
        for name, data in images.items():
            _save_image(hub / "imgs" / name, data)
    _write_parquet(hub / "data" / "validation-00000-of-00001.parquet", rows)
    from_hub = load_benchmark("slake", str(hub), split="val")
    from_release = load_benchmark("slake", release_dir, split="val")
    assert [e.id for e in from_hub] == ["11", "13"]                     # English only, as the release loader
    assert _without_image(from_hub) == _without_image(from_release)
    assert all(_same_pixels(h.image, r.image) for h, r in zip(from_hub, from_release))


@pytest.mark.parametrize("change, message", [
    ({"q_lang": 1}, r"q_lang is a int \(1\), expected a language code"),       # used to drop every row silently
    ({"answer": float("nan")}, r"field answer is nan \(missing in the source\?\)"),   # used to become "nan"
    ({"qid": {"a": 1}}, r"the id column holds a dict"),                         # used to become its repr
])
def test_hub_cells_of_the_wrong_kind_are_named_not_turned_into_text(tmp_path, change, message):
    # A parquet column has one type: the whole column is of the wrong kind, and the first row is named.
    rows = [{**{k: v for k, v in r.items() if k != "img_name"}, "image": _hub_image(_png()), **change}
            for r in SLAKE_ROWS]
    path = _write_parquet(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": row 0.*" + message):
        load_benchmark("slake", str(tmp_path / "hub"), split="val")


def test_slake_release_as_renamed_on_the_hub(tmp_path):
    """BoKelvin/SLAKE ships validation.json (renamed from validate.json)."""
    release_dir, _ = _slake_release(tmp_path, json_name="validation.json")
    assert [e.id for e in load_benchmark("slake", release_dir, split="val")] == ["11", "13"]
    assert [e.id for e in load_benchmark("slake", release_dir, split="validation")] == ["11", "13"]


# -------------------------------------------------------------------------------------------------------- PathVQA

PATHVQA_RECORDS = [("test_0001", "Is there necrosis?", "no"), ("test_0002", "What is present?", "fibrosis"),
                   ("test_0001", "Is it benign?", "yes")]


@pytest.mark.parametrize("layout", ["data/test-00000-of-00002.parquet",       # push_to_hub
                                    "default/test/0000.parquet",              # refs/convert/parquet
                                    "test/data-00000-of-00001.arrow",         # DatasetDict.save_to_disk
                                    "test/table.arrow"])                      # Arrow IPC file format
def test_pathvqa_hub_copy_reads_like_the_release(tmp_path, layout):
    images = {"test_0001": _png((1, 2, 3)), "test_0002": _png((4, 5, 6), size=(12, 10))}
    release = tmp_path / "release"
    for name, data in images.items():
        _save_image(release / "images" / "test" / f"{name}.png", data)
    with open(release / "test.jsonl", "w", encoding="utf-8") as f:
        for image, question, answer in PATHVQA_RECORDS:
            f.write(json.dumps({"image": image, "question": question, "answer": answer}) + "\n")
    rows = [{"image": _hub_image(images[image]), "question": q, "answer": a} for image, q, a in PATHVQA_RECORDS]
    writer = {"parquet": _write_parquet, "arrow": _write_arrow_stream}[layout.rsplit(".", 1)[1]]
    if layout == "test/table.arrow":
        writer = _write_arrow_file
    writer(tmp_path / "hub" / layout, rows)
    from_hub = load_benchmark("pathvqa", str(tmp_path / "hub"))
    from_release = load_benchmark("pathvqa", str(release))
    assert [(e.id, e.answer_type, e.match) for e in from_hub] == [
        ("test_0", "closed", "vqa"), ("test_1", "open", "f1"), ("test_2", "closed", "vqa")]
    assert _without_image(from_hub) == _without_image(from_release)
    assert all(_same_pixels(h.image, r.image) for h, r in zip(from_hub, from_release))
    assert from_hub[0].image == from_hub[2].image                        # the same bytes are stored once


def test_pathvqa_shards_are_read_in_order(tmp_path):
    first = [{"image": _hub_image(_png()), "question": f"q{i}?", "answer": "yes"} for i in range(2)]
    second = [{"image": _hub_image(_png()), "question": "q2?", "answer": "no"}]
    _write_parquet(tmp_path / "data" / "validation-00001-of-00002.parquet", second)
    _write_parquet(tmp_path / "data" / "validation-00000-of-00002.parquet", first)
    examples = load_benchmark("pathvqa", str(tmp_path), split="validation")
    assert [e.question for e in examples] == ["q0?", "q1?", "q2?"]
    assert hf_files.split_files(str(tmp_path), "val") == hf_files.split_files(str(tmp_path), "validation")


def test_shards_are_sorted_whatever_order_the_directory_lists_them_in(tmp_path, monkeypatch):
    for i in range(3):
        _write_parquet(tmp_path / "data" / f"test-0000{i}-of-00003.parquet",
                       [{"image": _hub_image(_png()), "question": f"q{i}?", "answer": "yes"}])
    listing = hf_files.glob.glob
    monkeypatch.setattr(hf_files.glob, "glob", lambda pattern: list(reversed(sorted(listing(pattern)))))
    assert [e.question for e in load_benchmark("pathvqa", str(tmp_path))] == ["q0?", "q1?", "q2?"]


# -------------------------------------------------------------------------------------------------------- PMC-VQA

PMC_HEADER = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer_label"]
PMC_ROWS = [
    ["0", "PMC1_F1.jpg", "Which imaging modality is shown?", "MRI", " A:CT ", " B:MRI ", " C:PET", " D:Ultrasound",
     "B"],
    ["1", "PMC2_F3.jpg", "What is the arrow pointing at?", "Liver", "A:Spleen", "B:Kidney", "C:Liver", "D:Heart", ""],
]
PMC_IMAGES = {"PMC1_F1.jpg": _png((9, 9, 9)), "PMC2_F3.jpg": _png((90, 90, 90))}


def _pmc_release(tmp_path):
    release = tmp_path / "release"
    for name, data in PMC_IMAGES.items():
        _save_image(release / "images" / name, data)
    with open(release / "test_clean.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PMC_HEADER)
        writer.writerows(PMC_ROWS)
    return str(release)


def test_pmc_vqa_parquet_with_the_release_columns_gives_the_release_examples(tmp_path):
    release = _pmc_release(tmp_path)
    hub = tmp_path / "hub"
    for name, data in PMC_IMAGES.items():
        _save_image(hub / "images" / name, data)
    _write_parquet(hub / "test_clean.parquet", [dict(zip(PMC_HEADER, row)) for row in PMC_ROWS])
    from_hub, from_release = load_benchmark("pmc_vqa", str(hub)), load_benchmark("pmc_vqa", release)
    assert [e.answer for e in from_hub] == ["B", "C"]
    assert _without_image(from_hub) == _without_image(from_release)


def test_pmc_vqa_parquet_with_images_inside_and_other_column_names(tmp_path):
    """Parquet conversions name the columns "question", "choice a", ..., "answer label" and hold the image."""
    release = _pmc_release(tmp_path)
    rows = [{"image": _hub_image(PMC_IMAGES[row[1]]), "caption": "a figure", "question": row[2], "answer": row[3],
             **{f"choice {c}": row[4 + i] for i, c in enumerate("abcd")}, "answer label": row[8]}
            for row in PMC_ROWS]
    _write_parquet(tmp_path / "hub" / "data" / "test_clean-00000-of-00001.parquet", rows)
    from_hub, from_release = load_benchmark("pmc_vqa", str(tmp_path / "hub")), load_benchmark("pmc_vqa", release)
    assert [e.id for e in from_hub] == ["test_clean_0", "test_clean_1"]
    assert [dataclasses.replace(e, id="") for e in _without_image(from_hub, "figure")] == \
        [dataclasses.replace(e, id="") for e in _without_image(from_release, "figure")]
    assert all(_same_pixels(h.image, r.image) for h, r in zip(from_hub, from_release))


def test_pmc_vqa_parquet_without_an_answer_column_is_named(tmp_path):
    rows = [{"image": _hub_image(_png()), "question": "q?", "choice a": "A:x", "choice b": "B:y"}]
    path = _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": missing column\(s\) Answer_label or Answer -- "
                       r"the file has columns image, question, choice a, choice b"):
        load_benchmark("pmc_vqa", str(tmp_path), split="test")


# ------------------------------------------------------------------------------------------------ errors, options

def test_corrupt_image_bytes_are_named_by_file_and_row(tmp_path):
    good = _noise_png()
    rows = [{"image": _hub_image(good), "question": "Is it?", "answer": "yes"},
            {"image": _hub_image(good[: len(good) // 2]), "question": "Is it?", "answer": "no"}]
    path = _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": row 1 \(id 'test_1'\): image bytes cannot be "
                                                              r"decoded \(OSError: image file is truncated"):
        load_benchmark("pathvqa", str(tmp_path))
    # Without image checks only the header is read: the truncated image is written as it is.
    assert len(load_benchmark("pathvqa", str(tmp_path), check_images=False)) == 2
    rows[1]["image"] = _hub_image(b"\x00 not an image at all")
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": row 1 \(id 'test_1'\): image bytes cannot be "
                                                              r"decoded \(UnidentifiedImageError"):
        load_benchmark("vqa_rad", str(tmp_path))


def test_image_cells_the_loader_cannot_use_are_named_by_row_when_the_benchmark_loads(tmp_path):
    """Too small or of a float mode (the release route's loader refuses those too), an image struct whose bytes are
    not bytes, a text cell that is not UTF-8: each a BenchmarkError naming the file and row, before any model."""
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    floats = io.BytesIO()
    Image.new("F", (32, 32)).save(floats, format="TIFF")
    for data, message in ((tiny.getvalue(), "image of 1x1 pixels is too small"),
                          (floats.getvalue(), "image mode 'F'")):
        _write_parquet(path, [{"image": _hub_image(_png()), "question": "Is it?", "answer": "yes"},
                              {"image": _hub_image(data), "question": "Is it?", "answer": "no"}])
        with pytest.raises(BenchmarkError, match=re.escape(str(path)) + r": row 1 \(id 'test_1'\): .*" + message):
            load_benchmark("pathvqa", str(tmp_path))
    _write_parquet(path, [{"image": {"bytes": "notbytes", "path": None}, "question": "Is it?", "answer": "no"}])
    with pytest.raises(BenchmarkError, match=re.escape(str(path)) + r": row 0 .*bytes are a str, not bytes"):
        load_benchmark("pathvqa", str(tmp_path))
    bad_text = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, 1], np.int32).tobytes()),
                                                      pa.py_buffer(b"\xff")])
    table = pa.table({"image": pa.array([_hub_image(_png())]), "question": bad_text, "answer": pa.array(["yes"])})
    pq.write_table(table, str(path))
    with pytest.raises(BenchmarkError, match=re.escape(str(path)) + ": a text cell is not UTF-8"):
        load_benchmark("pathvqa", str(tmp_path))


def test_missing_columns_list_what_is_expected_and_what_the_file_has(tmp_path):
    path = _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                          [{"image": _hub_image(_png()), "query": "Is it?", "label": "yes"}])
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": missing column\(s\) question \(one of: question\); "
                       r"answer \(one of: answer\) -- the file has columns image, query, label"):
        load_benchmark("vqa_rad", str(tmp_path))
    (example,) = load_benchmark("vqa_rad", str(tmp_path), columns={"question": "query", "answer": "label"})
    assert (example.question, example.answer, example.answer_type) == ("Is it?", "yes", "closed")


def test_empty_field_in_a_row_is_named(tmp_path):
    rows = [{"image": _hub_image(_png()), "question": "Is it?", "answer": "yes"},
            {"image": _hub_image(_png()), "question": "Is it?", "answer": None}]
    path = _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(BenchmarkError, match=re.escape(path) + r": row 1 \(id 'test_1'\): missing or empty "
                                                              r"field\(s\) answer"):
        load_benchmark("pathvqa", str(tmp_path))


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    os.makedirs(path.parent)
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(BenchmarkError, match=re.escape(str(path)) + ": not a readable parquet file"):
        load_benchmark("pathvqa", str(tmp_path))


def test_format_option_and_autodetection(tmp_path):
    """auto prefers the release file, then the Hub files; release / hf look for their own kind only."""
    _save_image(tmp_path / "images" / "a.png", _png())
    _write_json(tmp_path / "testset.json", [{"qid": 7, "image_name": "a.png", "question": "From the JSON?",
                                             "answer": "yes", "answer_type": "CLOSED"}])
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                   [{"image": _hub_image(_png()), "question": "From the parquet?", "answer": "yes"}])
    assert load_benchmark("vqa_rad", str(tmp_path))[0].question == "From the JSON?"
    assert load_benchmark("vqa_rad", str(tmp_path), format="release")[0].question == "From the JSON?"
    assert load_benchmark("vqa_rad", str(tmp_path), format="hf")[0].question == "From the parquet?"
    os.remove(tmp_path / "testset.json")
    assert load_benchmark("vqa_rad", str(tmp_path))[0].question == "From the parquet?"
    with pytest.raises(BenchmarkError, match=r"no VQA-RAD test file \(looked for testset.json\)$"):
        load_benchmark("vqa_rad", str(tmp_path), format="release")
    with pytest.raises(BenchmarkError, match=r"no PathVQA train file \(looked for Hugging Face files "
                                             r"data/train-\*.parquet, .*train/\*.arrow\)$"):
        load_benchmark("pathvqa", str(tmp_path), split="train", format="hf")
    with pytest.raises(BenchmarkError, match="format must be one of auto, release, hf"):
        load_benchmark("slake", str(tmp_path), format="json")


def test_images_are_written_once_and_reused(tmp_path):
    rows = [{"image": _hub_image(_png((7, 7, 7))), "question": f"q{i}?", "answer": "no"} for i in range(3)]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    first = load_benchmark("pathvqa", str(tmp_path))
    (path,) = {e.image for e in first}
    assert path.endswith(".png") and open(path, "rb").read() == _png((7, 7, 7))
    mtime = os.stat(path).st_mtime_ns
    assert load_benchmark("pathvqa", str(tmp_path)) == first and os.stat(path).st_mtime_ns == mtime
    files = [f for _, _, names in os.walk(tmp_path / "cache") for f in names]
    assert files == [os.path.basename(path)]
    # A cached file cut short (a crash of an older version, a full disk) is written again, not trusted.
    with open(path, "r+b") as f:
        f.truncate(10)
    assert load_benchmark("pathvqa", str(tmp_path)) == first and open(path, "rb").read() == _png((7, 7, 7))


def test_a_path_only_image_cell_is_resolved_under_the_image_folder(tmp_path):
    _save_image(tmp_path / "images" / "synpic1.jpg", _png())
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                   [{"image": _hub_image(None, "synpic1.jpg"), "question": "Is it?", "answer": "yes"},
                    {"image": _hub_image(None, "synpic2.jpg"), "question": "Is it?", "answer": "yes"}])
    with pytest.raises(BenchmarkError, match=r"row 1 \(id 'test_1'\): image 'synpic2.jpg' not found"):
        load_benchmark("vqa_rad", str(tmp_path))
    (example,) = load_benchmark("vqa_rad", str(tmp_path), limit=1)
    assert example.image == str(tmp_path / "images" / "synpic1.jpg")
