"""PhantomVQA: varied phantoms, splits from disjoint seeds, absent-lesion questions, answer balancing, and the
pretraining corpus kept apart from the benchmark."""

from __future__ import annotations

import collections
import json
import os
import shutil

import numpy as np
import pytest

from vital_jax.data import balance, phantom_corpus, phantoms
from vital_jax.data.build import build
from vital_jax.data.questions import QUESTIONS_FILE, read_questions
from vital_jax.data.records import RECORDS_FILE, read_records, write_records
from configs.data import phantom_vqa


def _liver_column(p):
    return np.nonzero(p.masks["liver"])[1].mean() / p.image.shape[1]


def test_varied_layout_puts_the_liver_on_either_side_and_standard_does_not():
    varied = [_liver_column(phantoms.make_phantom("CT", 5, i, 96, "varied")) for i in range(16)]
    standard = [_liver_column(phantoms.make_phantom("CT", 5, i, 96)) for i in range(16)]
    assert min(varied) < 0.5 < max(varied)
    assert max(standard) < 0.5
    with pytest.raises(ValueError, match="layout"):
        phantoms.make_phantom("CT", 0, 0, 96, "sideways")


@pytest.fixture(scope="module")
def small_vqa(tmp_path_factory):
    config = phantom_vqa.get_config()
    config.out_dir = str(tmp_path_factory.mktemp("phantom_vqa"))
    config.phantoms.size = 96
    config.phantoms.split_counts = (36, 6, 18)
    build(config)
    return config.out_dir


def test_splits_come_from_disjoint_phantoms(small_vqa):
    recs = read_records(os.path.join(small_vqa, RECORDS_FILE))
    images = collections.defaultdict(set)
    for r in recs:
        images[r.split].add(r.image)
    assert set(images) == {"train", "val", "test"}
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    assert all(os.path.basename(i).startswith("testphantom") for i in images["test"])


def test_absent_lesions_are_asked_about_and_answered_no(small_vqa):
    recs = read_records(os.path.join(small_vqa, RECORDS_FILE)) + read_records(
        os.path.join(small_vqa, balance.DROPPED_FILE))
    # An absence question's ROI is the organ the lesion would grow in, not a mask of the lesion.
    absent = [r for r in recs if r.target_type == "lesion" and r.target.replace(" ", "+") not in r.mask]
    assert absent and all(r.question_type == "yes_no" and r.answer.startswith("No") for r in absent)
    # The wording of the presence question about a lesion that is there: only the image tells them apart.
    from vital_jax.data import geometry, questions
    geo = geometry.measure(np.zeros((8, 8), np.uint8), np.ones((8, 8), bool))
    for r in absent[:5]:
        rng = np.random.default_rng(0)
        asked = {questions._yes_no(rng, r.target, "lesion", questions.MODALITY_PHRASES[r.modality], geo)[0]
                 for _ in range(20)}
        assert r.question in asked
    assert all(r.mask.endswith(("_liver.png", "_kidney.png")) for r in absent)


def test_closed_answers_are_balanced_per_question_text(small_vqa):
    recs = read_records(os.path.join(small_vqa, RECORDS_FILE))
    groups = collections.defaultdict(collections.Counter)
    for r in recs:
        if r.question_type in balance.CLOSED_TYPES:
            groups[(r.split, r.question)][balance.closed_answer(r)] += 1
    assert groups
    for counts in groups.values():
        assert len(counts) > 1 and len(set(counts.values())) == 1, counts


def test_the_question_text_alone_does_not_beat_the_majority_answer(small_vqa):
    """The best text-only predictor (each training question text's most frequent answer) is at the majority
    baseline on the test split; on the unbalanced records it is far above it (the reason for balancing)."""
    kept = read_records(os.path.join(small_vqa, RECORDS_FILE))
    everything = kept + read_records(os.path.join(small_vqa, balance.DROPPED_FILE))

    def text_only_and_majority(recs, qtype):
        train = [r for r in recs if r.split == "train" and r.question_type == qtype]
        test = [r for r in recs if r.split == "test" and r.question_type == qtype]
        by_text = collections.defaultdict(collections.Counter)
        for r in train:
            by_text[r.question][balance.closed_answer(r)] += 1
        overall = collections.Counter(balance.closed_answer(r) for r in train).most_common(1)[0][0]
        guess = lambda r: by_text[r.question].most_common(1)[0][0] if r.question in by_text else overall  # noqa
        text_only = np.mean([guess(r) == balance.closed_answer(r) for r in test])
        majority = collections.Counter(balance.closed_answer(r) for r in test).most_common(1)[0][1] / len(test)
        return text_only, majority

    text_only, majority = text_only_and_majority(kept, "yes_no")
    assert text_only <= majority + 0.05
    text_only, majority = text_only_and_majority(everything, "yes_no")
    assert text_only > majority + 0.1


def test_rebuilding_reuses_the_balanced_records(small_vqa):
    before = open(os.path.join(small_vqa, RECORDS_FILE)).read()
    config = phantom_vqa.get_config()
    config.out_dir = small_vqa
    config.phantoms.size = 96
    config.phantoms.split_counts = (36, 6, 18)
    summary = build(config)
    assert summary["distill"]["accepted"] == 0
    # The rerun reports the whole build, as the first run did: the answers balancing set aside count as asked
    # (the teacher may also have rejected some).
    assert summary["set_aside"] > 0 and summary["questions"] >= summary["records"] + summary["set_aside"]
    assert open(os.path.join(small_vqa, RECORDS_FILE)).read() == before


def test_balancing_stopped_between_its_two_writes_sets_each_record_aside_once(small_vqa, tmp_path):
    """balance_dropped.jsonl is written before records.jsonl shrinks; a build stopped between the two rewrites the
    set-aside records on its rerun: they must not be set aside twice."""
    from vital_jax.data import build as build_lib

    out = tmp_path / "copy"
    shutil.copytree(small_vqa, out)
    kept = read_records(str(out / RECORDS_FILE))
    dropped = read_records(str(out / balance.DROPPED_FILE))
    # As if stopped before records.jsonl was rewritten: the distilled records, in question order, as balancing read
    order = {q.id: i for i, q in enumerate(read_questions(str(out / QUESTIONS_FILE)))}
    write_records(str(out / RECORDS_FILE), sorted(kept + dropped, key=lambda r: order[r.id]))
    config = phantom_vqa.get_config()
    config.out_dir = str(out)
    build_lib._balance(config)
    assert [r.id for r in read_records(str(out / balance.DROPPED_FILE))] == [r.id for r in dropped]
    assert sorted(r.id for r in read_records(str(out / RECORDS_FILE))) == sorted(r.id for r in kept)


def test_pretraining_corpus_is_apart_from_the_benchmark(tmp_path, small_vqa):
    c = phantom_corpus.default_config()
    c.num_phantoms, c.phantom_size = 6, 96
    out = phantom_corpus.build_corpus(str(tmp_path / "corpus"), c)
    pairs = [json.loads(line) for line in open(os.path.join(out, phantom_corpus.PAIRS_FILE))]
    texts = [json.loads(line) for line in open(os.path.join(out, phantom_corpus.TEXTS_FILE))]
    assert {p["split"] for p in pairs} == {"train", "val"} and texts
    assert all(os.path.exists(os.path.join(out, p["image"])) for p in pairs)
    assert os.path.exists(os.path.join(out, phantom_corpus.TOKENIZER_DIR, "tokenizer.json"))
    # No benchmark question is a pretraining prompt, and no pretraining image is a benchmark image.
    bench = read_records(os.path.join(small_vqa, RECORDS_FILE))
    assert not {p["prompt"] for p in pairs} & {r.question for r in bench}
    from PIL import Image
    bench_pixels = {Image.open(os.path.join(small_vqa, r.image)).tobytes() for r in bench}
    assert not {Image.open(os.path.join(out, p["image"])).tobytes() for p in pairs} & bench_pixels
    # Same settings: reused; other settings: refused.
    assert phantom_corpus.build_corpus(out, c) == out
    c.seed = 7
    with pytest.raises(phantom_corpus.CorpusError, match="other settings"):
        phantom_corpus.build_corpus(out, c)
    with open(os.path.join(out, phantom_corpus.SUMMARY_FILE), "a") as f:  # a summary that no longer parses
        f.write("}")
    with pytest.raises(phantom_corpus.CorpusError, match=f"{phantom_corpus.SUMMARY_FILE}: malformed JSON"):
        phantom_corpus.build_corpus(out, c)


def test_contrast_questions_are_answered_from_the_image(small_vqa):
    """"Is the liver brighter than the tissue around it?" names no modality; the answer follows the image: the
    liver is brighter than its surround on CT and darker on T2-like MRI."""
    recs = read_records(os.path.join(small_vqa, RECORDS_FILE)) + read_records(
        os.path.join(small_vqa, balance.DROPPED_FILE))
    liver = [r for r in recs if r.question == "Is the liver brighter than the tissue around it in the image?"]
    assert {r.modality for r in liver} & {"CT", "MRI"}
    for r in liver:
        if r.modality == "ultrasound":  # echogenicity against speckle: either way
            continue
        assert r.answer.startswith("Yes" if r.modality == "CT" else "No"), (r.modality, r.answer)
