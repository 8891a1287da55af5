"""Question templates: K ranges of Table 4, conditioning on target type and modality, determinism; splits."""

from __future__ import annotations

import collections
import dataclasses
import types

import numpy as np
import pytest

from vital_jax.data import geometry, questions
from vital_jax.data.records import MODALITIES, QUESTION_TYPES, STEP_RANGES


def _geo(center=(0.5, 0.5), radius=0.1, size=100):
    yy, xx = np.mgrid[0:size, 0:size]
    mask = (yy - center[0] * size) ** 2 + (xx - center[1] * size) ** 2 < (radius * size) ** 2
    return geometry.measure(np.zeros((size, size), np.uint8), mask)


def _ask(question_type, seed=0, key="k", target="liver", target_type="organ", modality="CT", geo=None,
         image="images/a.png"):
    return questions.make_question(question_type, image_id="a", image_path=image, mask_path="masks/a_liver.png",
                                   target=target, target_type=target_type, modality=modality, source="phantom",
                                   normal_anatomy=target_type == "organ", geo=geo or _geo((0.3, 0.2)),
                                   rng=questions.question_rng(seed, key))


def test_step_ranges_are_those_of_table_4():
    # App. A.2: yes/no, identify, location-choice exactly 1; location exactly 2; describe 2-3; reasoning 3-4.
    assert STEP_RANGES == {"yes_no": (1, 1), "identify": (1, 1), "location_choice": (1, 1), "location": (2, 2),
                           "describe": (2, 3), "reasoning": (3, 4)}


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_requested_k_covers_the_type_range(question_type):
    ks = {_ask(question_type, key=str(i)).latent_steps for i in range(40)}
    low, high = STEP_RANGES[question_type]
    assert ks == set(range(low, high + 1))


def test_questions_are_deterministic_under_the_seed():
    a = [_ask(t, seed=5, key=str(i)) for t in QUESTION_TYPES for i in range(10)]
    b = [_ask(t, seed=5, key=str(i)) for t in QUESTION_TYPES for i in range(10)]
    c = [_ask(t, seed=6, key=str(i)) for t in QUESTION_TYPES for i in range(10)]
    assert a == b and a != c


def test_templates_follow_target_type_and_modality():
    lesion = {_ask("reasoning", key=str(i), target="liver tumor", target_type="lesion", modality="ultrasound").question
              for i in range(10)}
    assert lesion == {"Analyze the visual findings that distinguish the liver tumor from the surrounding tissue "
                      "in this ultrasound image."}
    identify = _ask("identify", target_type="other", modality="fundus", geo=_geo((0.2, 0.8)))
    assert identify.question in ("What structure is shown in the upper right part of the image in this fundus "
                                 "photograph?", "Which structure can be seen in the upper right part of the image "
                                 "in this fundus photograph?")
    assert "abnormality" in _ask("identify", target_type="lesion").question
    assert "There" not in _ask("yes_no", target_type="lesion").question
    assert _ask("identify").id == "a__liver__identify"


def test_location_choice_offers_coarse_regions():
    q = _ask("location_choice")
    assert q.choices in (("left", "right", "center"), ("upper", "middle", "lower"))
    assert all(c in q.question for c in q.choices) and q.slots["axis"] in ("horizontal", "vertical")


def test_a_closed_answer_is_read_one_way_for_the_balancer_the_benchmark_and_the_gate():
    from vital_jax.data import balance, quality_gate
    from vital_jax.eval.benchmarks import BenchmarkError, closed_question

    horizontal = "Is the left kidney in the left, right, or center of the image?"
    vertical = "Is the liver in the upper, middle, or lower part of the image?"
    cases = [("yes_no", "Is the liver visible?", "Yes, the liver is visible.", "liver", ("yes", ("yes", "no"))),
             ("yes_no", "Is there a cyst?", "  no.", "cyst", ("no", ("yes", "no"))),
             # The target's own "left" does not choose; "central" names "center".
             ("location_choice", horizontal, "The left kidney is right of the midline.", "left kidney",
              ("right", ("left", "right", "center"))),
             ("location_choice", horizontal, "The left kidney is central.", "left kidney",
              ("center", ("left", "right", "center"))),
             ("location_choice", vertical, "It lies in the LOWER part.", "liver",
              ("lower", ("upper", "middle", "lower")))]
    for qtype, question, answer, target, want in cases:
        assert questions.closed_answer(qtype, question, answer, target) == want
        assert closed_question("r", qtype, question, answer, target) == want
        record = types.SimpleNamespace(id="r1", question=question, answer=answer, question_type=qtype, target=target)
        assert balance.closed_answer(record) == want[0]
    gate = quality_gate.GateContext(question_type="location_choice", target="left kidney", target_type="organ",
                                    normal_anatomy=True, choices=("left", "right", "center"))
    assert quality_gate.normalize_answer("The left kidney is central.", gate) == "The left kidney is central."
    with pytest.raises(ValueError, match="exactly one of left, right, center"):
        quality_gate.normalize_answer("The left kidney is visible.", gate)
    bad = [("yes_no", "Is the liver visible?", "There is no liver.", "liver", "does not start with yes or no"),
           ("location_choice", "Where is the liver?", "Left.", "liver", "names no choice set"),
           ("location_choice", vertical, "The upper and middle parts.", "liver", "exactly one of upper, middle"),
           ("location_choice", horizontal, "The left kidney is visible.", "left kidney", "exactly one of left"),
           ("identify", "What is shown?", "The liver.", "liver", "not a closed-ended question type")]
    for qtype, question, answer, target, message in bad:
        with pytest.raises(ValueError, match=message):
            questions.closed_answer(qtype, question, answer, target)
        with pytest.raises(BenchmarkError, match=f"record 7: .*{message}"):
            closed_question("record 7", qtype, question, answer, target)


def test_yes_no_asks_about_sides_only_when_the_target_is_off_centre():
    centred = [_ask("yes_no", key=str(i), geo=_geo((0.5, 0.5), radius=0.12)) for i in range(30)]
    assert {q.template for q in centred} == {"yes_no_presence", "yes_no_size"}
    off = [_ask("yes_no", key=str(i), geo=_geo((0.2, 0.8), radius=0.1)) for i in range(60)]
    sides = {q.slots["side"] for q in off if q.template == "yes_no_side"}
    assert sides == {"left", "right", "upper", "lower"}
    # An area fraction of ~0.045 is within 1.5x of 1/20 only: the size question asks about 1/10 or 1/4.
    assert {q.slots["threshold"] for q in centred if q.template == "yes_no_size"} <= {0.1, 0.25}


def test_a_side_is_asked_only_when_the_whole_target_lies_in_an_outer_third():
    bar = np.zeros((300, 300), bool)
    bar[140:160, 0:185] = True  # 0..0.62 of the width: centroid in the left third, a third of it right of the midline
    geo = geometry.measure(np.zeros((300, 300), np.uint8), bar)
    assert geo.horizontal == "left" and geometry.side_of(geo, "horizontal") is None
    bar[:, 100:] = False        # now 0..0.33: wholly in the left third
    assert geometry.side_of(geometry.measure(np.zeros((300, 300), np.uint8), bar), "horizontal") == "left"


def _split_fixture():
    qs = []
    for modality in ("CT", "MRI"):
        for i in range(10):
            for t in QUESTION_TYPES:
                qs.append(_ask(t, key=f"{modality}{i}", modality=modality, image=f"images/{modality}{i}.png"))
    return qs


def test_splits_group_by_image_and_stratify_by_modality_and_type():
    qs = questions.assign_splits(_split_fixture(), (0.8, 0.1, 0.1), seed=0)
    per_image = collections.defaultdict(set)
    for q in qs:
        per_image[q.image].add(q.split)
    assert all(len(s) == 1 for s in per_image.values())
    counts = collections.Counter((q.split, q.modality, q.question_type) for q in qs)
    for modality in ("CT", "MRI"):
        for t in QUESTION_TYPES:
            assert [counts[(s, modality, t)] for s in ("train", "val", "test")] == [8, 1, 1]
    again = questions.assign_splits(_split_fixture(), (0.8, 0.1, 0.1), seed=0)
    other = questions.assign_splits(_split_fixture(), (0.8, 0.1, 0.1), seed=1)
    assert [q.split for q in again] == [q.split for q in qs] != [q.split for q in other]


def test_slices_of_one_volume_stay_in_one_split():
    qs = []
    for i in range(20):  # 5 volumes of 4 slices, each slice its own image
        for t in QUESTION_TYPES:
            q = _ask(t, key=f"{i}{t}", image=f"images/case_{i // 4}_z{i:03d}.png")
            qs.append(dataclasses.replace(q, group=f"case_{i // 4}"))
    split_of = collections.defaultdict(set)
    for q in questions.assign_splits(qs, (0.6, 0.2, 0.2), seed=0):
        split_of[q.group].add(q.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert collections.Counter(s for (s,) in split_of.values()) == {"train": 3, "val": 1, "test": 1}


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="summing to 1"):
        questions.assign_splits([], (0.8, 0.3, 0.1))


def test_questions_file_round_trip(tmp_path):
    qs = [_ask(t) for t in QUESTION_TYPES]
    path = str(tmp_path / questions.QUESTIONS_FILE)
    questions.write_questions(path, qs)
    assert questions.read_questions(path) == qs
    record = qs[4].to_record("The liver is smooth.", ["step one.", "step two."])
    assert record.latent_steps == 2 and record.id == qs[4].id and record.roi_index == -1


def test_small_datasets_get_an_image_in_every_split():
    qs = [_ask(t, key=f"{i}", image=f"images/{i}.png") for i in range(3) for t in QUESTION_TYPES]
    splits = {q.image: q.split for q in questions.assign_splits(qs, (0.8, 0.1, 0.1), seed=0)}
    assert sorted(splits.values()) == ["test", "train", "val"]
    no_test = questions.assign_splits(qs, (0.9, 0.1, 0.0), seed=0)
    assert "test" not in {q.split for q in no_test}


def test_images_whose_strata_are_their_own_still_fill_every_split():
    # Each image its own modality: every split scores alike for every image, and ties go to train.
    qs = [_ask(t, key=f"{i}{t}", modality=m, image=f"images/{i}.png") for i, m in enumerate(MODALITIES[:6])
          for t in QUESTION_TYPES]
    split_of = {}
    for q in questions.assign_splits(qs, (0.8, 0.1, 0.1), seed=0):
        assert split_of.setdefault(q.image, q.split) == q.split  # one split per image
    assert collections.Counter(split_of.values()) == {"train": 4, "val": 1, "test": 1}
    two = {q.image: q.split for q in questions.assign_splits(qs[:2 * len(QUESTION_TYPES)], (0.8, 0.1, 0.1))}
    assert sorted(two.values()) == ["train", "val"]  # too few images for three splits: test stays empty


def test_target_keys_tell_apart_names_with_one_slug():
    keys = questions.target_keys(["left kidney", "Left_Kidney", "left-kidney-1", "liver", "liver"])
    assert keys == {"Left_Kidney": "left-kidney-2", "left kidney": "left-kidney-3", "left-kidney-1": "left-kidney-1",
                    "liver": "liver"}
    assert len(set(keys.values())) == len(keys)
