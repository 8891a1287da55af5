"""The offline geometry teacher on real anatomy (BiomedParse demo images in ../shared/data): several separate
regions described as such, modality-correct contrast words that never contradict the target's name, one location
rule across question types in image space, and grammatical English. Every assertion reads the produced text."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import pytest

from vital_jax.data import ingest, questions, teacher
from vital_jax.data import quality_gate as gate
from vital_jax.data.geometry import measure
from vital_jax.data.geometry_teacher import GeometryTeacher
from vital_jax.data.records import QUESTION_TYPES, STEP_RANGES

TEACHER = GeometryTeacher()
SIDE_WORDS = ("left", "right", "upper", "lower")


@functools.lru_cache(maxsize=None)
def _load(root: str, image_id: str, target: str):
    """(image, mask, modality, mask file): the teacher caches its measurements by the image and mask paths."""
    image = ingest.load_rgb(os.path.join(root, "demo", f"{image_id}.png"))
    mask_file = f"{image_id}_{target.replace(' ', '+')}.png"
    mask = ingest.load_mask(os.path.join(root, "demo_mask", mask_file), image.shape[:2])
    _, modality, _ = ingest.parse_biomedparse_stem(image_id, image_id)
    return image, mask, modality, mask_file


@pytest.fixture(scope="module")
def demo(shared_data_dir):
    return os.path.join(shared_data_dir, "biomedparse_demo")


def _ask(image, mask, modality, mask_file, target, question_type, key="0", name=None):
    """The question (None when it is not asked) about the target of `mask_file`, named `name` if given;
    brightness questions included."""
    name = name or target
    return questions.make_question(question_type, image_id="demo", image_path=f"images/{mask_file}",
                                   mask_path=f"masks/{mask_file}", target=name,
                                   target_type=ingest.classify_target(name), modality=modality,
                                   source="biomedparse", normal_anatomy=False, geo=_measure(image, mask),
                                   rng=questions.question_rng(0, f"{target}/{question_type}/{key}"),
                                   contrast_questions=True)


_MEASURED: dict = {}


def _measure(image, mask):
    key = (id(image), mask.tobytes().__hash__())
    if key not in _MEASURED:
        _MEASURED[key] = measure(image, mask)
    return _MEASURED[key]


def _answer(q, image, mask) -> gate.TeacherOutput:
    """The teacher's answer after the gate (which must accept it)."""
    result = gate.check(TEACHER.generate(q, image, mask), teacher._gate_context(q, image, mask))
    assert result.accepted, (q.question, result.violation)
    return result.output


def _everything(image, mask, modality, mask_file, target, name=None, keys=range(4)):
    """(question, output) for every question type and every K of its range, over a few seeds."""
    out = []
    for question_type in QUESTION_TYPES:
        low, high = STEP_RANGES[question_type]
        for key in keys:
            for k in range(low, high + 1):
                q = _ask(image, mask, modality, mask_file, target, question_type, key=str(key), name=name)
                if q is not None:
                    q = dataclasses.replace(q, latent_steps=k)
                    out.append((q, _answer(q, image, mask)))
    return out


def _texts(pairs, question_types=QUESTION_TYPES):
    return [t for q, o in pairs if q.question_type in question_types for t in (o.final_answer, *o.reasoning_chain)]


# ------------------------------------------------------------------------ item 11: several separate regions
@pytest.mark.parametrize("image_id, target", [("15_X-Ray_chest", "lung"), ("15_X-Ray_chest", "COVID-19 infection"),
                                              ("17_X-Ray_chest", "viral pneumonia"), ("24_endoscope_colon", "polyp")])
def test_bilateral_targets_are_two_regions_one_in_each_side_never_one_shape_in_the_centre(demo, image_id, target):
    image, mask, modality, mask_file = _load(demo, image_id, target)
    pairs = _everything(image, mask, modality, mask_file, target)
    location = next(o for q, o in pairs if q.question_type == "location")
    assert location.final_answer == f"The {target} is located in the left and right parts of the image."
    assert location.reasoning_chain[1].startswith("One lies in the left part of the image and one in the right "
                                                  "part of the image;"), location.reasoning_chain
    # Each region's size, tied to its place.
    percent = r"(?:about \d+%|less than 1%)"
    for q, o in pairs:
        if q.question_type == "reasoning":
            assert re.search(rf"the one in the left part of the image covers {percent} of the image area and the one "
                             rf"in the right part {percent}\.", o.reasoning_chain[1]), o.reasoning_chain
    for q, o in pairs:
        text = " ".join((o.final_answer, *o.reasoning_chain))
        assert "central part of the image" not in text and "center of the image" not in text, (q.question, text)
        if q.question_type in ("describe", "reasoning"):
            assert "two separate regions" in text and "on either side of the vertical midline" in text, text
    identify = next(q for q, _ in pairs if q.question_type == "identify")
    assert "in the left and right parts of the image" in identify.question
    # Asked where its regions agree (both in the middle third of the height), never across them.
    choices = {q.slots["axis"] for q, _ in pairs if q.question_type == "location_choice"}
    sides = {q.slots["side"] for q, _ in pairs if q.template == "yes_no_side"}
    assert choices == {"vertical"} and not sides & {"left", "right"}


def test_scattered_glands_are_described_as_scattered_with_the_largest_located(demo):
    image, mask, modality, mask_file = _load(demo, "18_pathology_colon", "glandular structure")
    pairs = _everything(image, mask, modality, mask_file, "glandular structure")
    location = next(o for q, o in pairs if q.question_type == "location")
    assert location.final_answer == ("The glandular structure is located in four separate regions scattered "
                                     "across the whole image, the largest in the left part of the image.")
    assert all("central part of the image" not in t for t in _texts(pairs)), _texts(pairs)
    # Its regions lie in different thirds both across and down the image: no location choice is asked.
    assert "location_choice" not in {q.question_type for q, _ in pairs}
    assert _ask(image, mask, modality, mask_file, "glandular structure", "location_choice") is None
    identify = next(q for q, _ in pairs if q.question_type == "identify")
    assert "across the whole image" in identify.question


def test_glands_in_the_upper_two_thirds_are_scattered_across_the_upper_two_thirds(demo):
    image, mask, modality, mask_file = _load(demo, "18_pathology_colon", "glandular structure")
    upper = mask.copy()
    upper[2 * mask.shape[0] // 3:] = False   # the same real glands, cut below the upper two thirds
    pairs = _everything(image, upper, modality, "upper-glands.png", "glandular structure")
    location = next(o for q, o in pairs if q.question_type == "location")
    assert "four separate regions scattered across the upper two thirds of the image" in location.final_answer
    assert {q.slots["axis"] for q, _ in pairs if q.question_type == "location_choice"} <= {"vertical"}


# ---------------------------------------------------------------------------- item 12: modality vocabulary
_FOREIGN = {"CT": r"echoic|echogenic|intens|lucen|staining|pigment",
            "X-Ray": r"echoic|echogenic|intens|staining|pigment",
            "MRI": r"echoic|echogenic|hyperdense|hypodense|density|attenuation|lucen|opaci|staining",
            "ultrasound": r"intens|hyperdense|hypodense|density|attenuation|lucen|opaci|staining",
            "pathology": r"echoic|echogenic|intens|hyperdense|hypodense|density|attenuation|lucen|opaci|brightness",
            "dermoscopy": r"echoic|echogenic|intens|hyperdense|hypodense|density|attenuation|lucen|opaci|staining"}


@pytest.mark.parametrize("image_id, target, expected", [
    ("15_X-Ray_chest", "lung", ("greater lucency", "radiolucent")),           # aerated lung: lucent
    ("07_CT_abdomen", "kidney", ("higher attenuation", "hyperdense")),
    ("07_CT_abdomen", "kidney cyst", ("lower attenuation", "hypodense")),
    ("10_MRI-T1-Gd_brain", "enhancing tumor", ("higher signal intensity", "hyperintense")),
    ("20_ultrasound_breast", "tumor", ("anechoic",)),
    ("22_ultrasound_transperineal", "public symphysis", ("hyperechoic",)),
    ("18_pathology_colon", "glandular structure", ("paler staining",)),
    ("25_dermoscopy_skin", "melanoma", ("darker pigmentation",)),
])
def test_contrast_is_worded_in_the_modality_s_own_vocabulary(demo, image_id, target, expected):
    image, mask, modality, mask_file = _load(demo, image_id, target)
    text = " ".join(_texts(_everything(image, mask, modality, mask_file, target, keys=range(1)))).lower()
    assert all(word in text for word in expected), text
    assert not re.search(_FOREIGN[modality], text), re.search(_FOREIGN[modality], text)


@pytest.mark.parametrize("image_id, target", [("15_X-Ray_chest", "COVID-19 infection"),
                                              ("17_X-Ray_chest", "viral pneumonia"),
                                              ("00_CT_lung", "COVID-19 infection")])
def test_an_opacity_by_name_is_never_called_lucent_or_darker(demo, image_id, target):
    """These masks cover whole lung fields, darker than the chest wall around them; the infection itself is an
    opacity, so the chain states the quality without the direction the surround would give it."""
    image, mask, modality, mask_file = _load(demo, image_id, target)
    pairs = _everything(image, mask, modality, mask_file, target)
    for text in _texts(pairs):
        assert not re.search(r"lucen|hypodense|lower attenuation|darker", text, re.IGNORECASE), text
    assert any(("varying opacity" if modality == "X-Ray" else "varying attenuation") in t for t in _texts(pairs))
    # A brightness question would have to answer "darker": it is not asked about such a target.
    q = _ask(image, mask, modality, mask_file, target, "yes_no")
    contrast = [_ask(image, mask, modality, mask_file, target, "yes_no", key=str(k)) for k in range(40)]
    assert q is not None and not [c for c in contrast if c.template == "yes_no_contrast"]


# -------------------------------------------------------------------------- item 13: one location rule
def _half_of(answer: str) -> str:
    return re.search(r"in the (left|right|upper|lower) half of the image", answer).group(1)


def _choice_of(answer: str) -> str:
    return re.search(r"in the (left|right|upper|middle|lower) part of the image|in the (center) of the image",
                     answer).group(1) or "center"


@pytest.mark.parametrize("image_id, target, in_an_outer_third", [
    ("20_ultrasound_breast", "tumor", False),   # centre at 35% of the width: left half, central third
    ("01_CT_lung", "nodule", True), ("15_X-Ray_chest", "left lung", True), ("07_CT_abdomen", "tumor", True),
    ("00_CT_lung", "COVID-19 infection", True), ("06_CT_abdomen", "liver", True), ("13_MRI_abdomen", "spleen", True),
    ("24_endoscope_colon", "polyp", False),     # one region in each outer third, both in the middle third
])
def test_halves_and_thirds_never_disagree_about_one_target(demo, image_id, target, in_an_outer_third):
    """A side question ("in the left half?") is asked only where the half and the third agree, and its answer
    gives the midline definition; the location choice, the location and the side answer then name one side."""
    image, mask, modality, mask_file = _load(demo, image_id, target)
    asked = [_ask(image, mask, modality, mask_file, target, "yes_no", key=str(k)) for k in range(60)]
    sides = [q for q in asked if q.template == "yes_no_side"]
    assert bool(sides) == in_an_outer_third
    for q in sides:
        out = _answer(q, image, mask)
        half = _half_of(out.final_answer)
        axis = "horizontal" if half in ("left", "right") else "vertical"
        choices = [_ask(image, mask, modality, mask_file, target, "location_choice", key=str(k)) for k in range(40)]
        choice_q = next(c for c in choices if c is not None and c.slots["axis"] == axis)
        assert _choice_of(_answer(choice_q, image, mask).final_answer) == half, (q.question, out.final_answer)
        location = _answer(_ask(image, mask, modality, mask_file, target, "location"), image, mask).final_answer
        assert half in location and "central" not in location.replace("upper central", "").replace(
            "lower central", ""), (half, location)
        chain = " ".join(out.reasoning_chain)
        assert "midline" in chain and not re.search(r"central|center of the image|middle part", chain), chain


def test_positions_are_in_image_space_even_for_a_target_named_by_the_patient_s_side(demo):
    """The left lung is in the right part of the image; every position word outside the name is anchored to the
    image (or its midline), and nothing is said in patient space."""
    image, mask, modality, mask_file = _load(demo, "15_X-Ray_chest", "left lung")
    pairs = _everything(image, mask, modality, mask_file, "left lung")
    location = next(o for q, o in pairs if q.question_type == "location")
    assert location.final_answer == "The left lung is located in the right part of the image."
    for q, o in pairs:
        for text in (q.question, o.final_answer, *o.reasoning_chain):
            for sentence in re.split(r"(?<=[.;?])\s+", text.replace("left lung", "LUNG")):
                if re.search(rf"\b(?:{'|'.join(SIDE_WORDS)})\b", sentence):
                    assert re.search(r"\bimage\b|\bmidline\b", sentence), sentence
                assert not re.search(r"patient|anatomical", sentence, re.IGNORECASE), sentence


# --------------------------------------------------------------------------------------- item 14: grammar
_BAD_A = re.compile(r"\b[Aa] (?!uni|use|usu|uter|ure|uri|uro|one\b)[aeiouAEIOU]\w*")
_BAD_AN = re.compile(r"\b[Aa]n (?!h|[A-Z]{2}|X-)[b-df-hj-np-tv-z]\w*")


def test_articles_are_right_in_every_question_and_answer_about_real_targets(demo):
    targets = [("06_CT_abdomen", "liver"), ("10_MRI-T1-Gd_brain", "enhancing tumor"),
               ("10_MRI-T1-Gd_brain", "non-enhancing tumor"), ("15_X-Ray_chest", "COVID-19 infection"),
               ("18_pathology_colon", "glandular structure"), ("20_ultrasound_breast", "tumor"),
               ("04_CT_liver", "vessel"), ("24_endoscope_colon", "polyp")]
    for image_id, target in targets:
        image, mask, modality, mask_file = _load(demo, image_id, target)
        pairs = _everything(image, mask, modality, mask_file, target, keys=range(6))
        for text in [q.question for q, _ in pairs] + _texts(pairs):
            assert not _BAD_A.search(text) and not _BAD_AN.search(text), text
    image, mask, modality, mask_file = _load(demo, "10_MRI-T1-Gd_brain", "enhancing tumor")
    asked = [_ask(image, mask, modality, mask_file, "enhancing tumor", "yes_no", key=str(k)) for k in range(20)]
    presence = [q.question for q in asked if q.template == "yes_no_presence"]
    assert presence and set(presence) == {"Is there an enhancing tumor visible in this MRI scan?"}


def test_a_plural_target_name_takes_plural_verbs(demo):
    """Real pathology glands, labelled as a plural ("epithelial cells"): "are", never "is", in every question and
    answer about them, both for all four glands and for the one in the left third of the image."""
    image, mask, modality, mask_file = _load(demo, "18_pathology_colon", "glandular structure")
    left = mask.copy()
    left[:, mask.shape[1] // 3:] = False
    for part, key in ((mask, "epithelial-cells.png"), (left, "epithelial-cells-left.png")):
        pairs = _everything(image, part, modality, key, "glandular structure", name="epithelial cells",
                            keys=range(6))
        for text in [q.question for q, _ in pairs] + _texts(pairs):
            assert not re.search(r"\b(?:is|does|has|was) the epithelial cells\b|"
                                 r"(?<!of )\bthe epithelial cells (?:is|has|was|"
                                 r"appears|lies|occupies|covers|spans)\b|\bthere is epithelial|\b(?:it|they) (?:ly|"
                                 r"lies|spans|has)\b|\bly\b", text, re.IGNORECASE), text
        asked = {q.question for q, _ in pairs}
        assert any(q.startswith(("Are the epithelial cells", "Where are the epithelial cells")) for q in asked)
        identify = next(o for q, o in pairs if q.question_type == "identify")
        assert identify.final_answer == "The main structures shown there are the epithelial cells."
    location = next(o for q, o in pairs if q.question_type == "location")
    assert location.final_answer == "The epithelial cells are located in the left part of the image."
    assert location.reasoning_chain[1].startswith("Their centre lies in the left part of the image, and they span")
