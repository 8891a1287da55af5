"""Quality gate (App. A.3): each round rejects what it should and names it; clean samples pass, normalised."""

from __future__ import annotations

import json

import pytest

from vital_jax.data import quality_gate as gate
from vital_jax.data.quality_gate import GateContext

ORGAN = GateContext(question_type="describe", target="liver", target_type="organ", normal_anatomy=True)
LESION = GateContext(question_type="describe", target="liver tumor", target_type="lesion", normal_anatomy=False)
CLEAN_CHAIN = ["The structure in the upper left is large and homogeneous.", "Its margin is smooth and regular."]


def _raw(answer="The liver appears smooth and homogeneous.", chain=CLEAN_CHAIN, **extra):
    return json.dumps({"final_answer": answer, "reasoning_chain": chain, **extra})


@pytest.mark.parametrize("raw, round_name, fragment", [
    ("not json", "json_schema", "not valid JSON"),
    ("```json\n" + _raw() + "\n```", "json_schema", "code fence"),
    ("[1, 2]", "json_schema", "must be a JSON object"),
    (json.dumps({"answer": "x", "reasoning_chain": ["a"]}), "json_schema", "missing field(s) ['final_answer']"),
    (_raw(confidence=0.9), "json_schema", "unexpected field(s) ['confidence']"),
    (_raw(answer=""), "json_schema", "final_answer must be a non-empty string"),
    (_raw(chain="one step"), "json_schema", "reasoning_chain must be a list"),
    (_raw(chain=["ok", ""]), "json_schema", "reasoning_chain must be a list"),
    (_raw(answer="The liver mask is smooth."), "annotation_leakage", "'mask'"),
    (_raw(chain=["The red region marks the liver.", "Fine."]), "annotation_leakage", "'red region'"),
    (_raw(chain=["The highlighted  area is bright.", "The yellow contour is smooth."]), "annotation_leakage",
     "'highlighted', 'yellow contour'"),
    (_raw(chain=["Based on the segmentation, it is the liver.", "x."]), "annotation_leakage", "'segmentation'"),
    (_raw(chain=["The Overlay shows it.", "x."]), "annotation_leakage", "'overlay'"),
    (_raw(answer="A hypodense lesion is seen in the liver."), "pathology_terms", "'lesion'"),
    (_raw(chain=["It contains a small Mass.", "No cyst."]), "pathology_terms", "'mass', 'cyst'"),
    (_raw(chain=["It lies on the patient's right.", "x."]), "spatial_convention", "patient's right"),
    (_raw(chain=["It lies to the anatomical left.", "x."]), "spatial_convention", "anatomical left"),
    (_raw(chain=["It is on the right side of the patient.", "x."]), "spatial_convention", "right side of the patient"),
    (_raw(chain=["Only one step."]), "step_count", "1 step(s); a describe question needs 2 to 3"),
    (_raw(chain=["a.", "b.", "c.", "d."]), "step_count", "4 step(s)"),
])
def test_each_round_rejects_what_it_should(raw, round_name, fragment):
    result = gate.check(raw, ORGAN)
    assert not result.accepted and result.round == round_name
    assert fragment in result.violation, result.violation
    assert result.rounds_passed == gate.ROUNDS.index(round_name)
    prompt = gate.retry_prompt(result, attempt=1)
    assert round_name in prompt and result.violation in prompt


def test_ordinary_radiology_wording_is_not_taken_for_annotation_leakage():
    """"contour", "outlined", "hidden" and "marker" alone rejected replies such as "Its contour is smooth" (each a
    paid regeneration, whose prompt then forbade the word)."""
    for text in ("The kidney has a smooth contour.", "It is well outlined against the fat.",
                 "It is partly hidden behind the ribs.", "No tumour marker can be read from an image."):
        assert gate.check(_raw(chain=[text, "Its margin is smooth and regular."]), LESION).accepted, text
    for text, term in (("The drawn contour follows the kidney.", "drawn contour"),
                       ("The outlined region is bright.", "outlined region")):
        result = gate.check(_raw(chain=[text, "Its margin is smooth and regular."]), LESION)
        assert result.round == "annotation_leakage" and repr(term) in result.violation, result.violation


def test_pathology_terms_are_allowed_for_lesions_and_non_normal_organs():
    raw = _raw(answer="A round hypodense lesion sits inside the liver.")
    assert gate.check(raw, LESION).accepted
    assert gate.check(raw, GateContext("describe", "liver", "organ", normal_anatomy=False)).accepted
    # ...but leakage and patient-space wording are refused for every source.
    assert gate.check(_raw(answer="The masked lesion is dark."), LESION).round == "annotation_leakage"
    assert gate.check(_raw(answer="The lesion is on the patient left."), LESION).round == "spatial_convention"


def test_image_space_wording_and_clinical_words_are_not_false_positives():
    chain = ["The liver occupies the left side of the image, with a smooth margin.",
             "Its density is uniform; the right part of the image shows the spleen."]
    result = gate.check(_raw(chain=chain), ORGAN)
    assert result.accepted and result.output.reasoning_chain == tuple(chain)


def _answer(question_type, answer, steps=None, choices=(), target_type="organ"):
    lo = gate.STEP_RANGES[question_type][0]
    context = GateContext(question_type, "liver", target_type, normal_anatomy=False, choices=choices)
    return gate.check(_raw(answer=answer, chain=[f"Step {i}." for i in range(steps or lo)]), context)


@pytest.mark.parametrize("question_type, answer, expected", [
    ("yes_no", "yes", "Yes."),
    ("yes_no", "NO.", "No."),
    ("yes_no", "Yes, the liver is visible!", "Yes, the liver is visible."),
    ("yes_no", "no the liver is in the right half", "No, the liver is in the right half."),
    ("yes_no", "Yes, MRI shows the liver.", "Yes, MRI shows the liver."),  # an acronym keeps its capitals
    ("yes_no", "No, The liver is absent.", "No, the liver is absent."),
    ("identify", "pancreas", "The main organ shown is the pancreas."),
    ("identify", "Liver", "The main organ shown is the liver."),
    ("identify", "COVID-19 infection", "The main organ shown is the COVID-19 infection."),
    ("identify", "The liver", "The main organ shown is the liver."),
    ("identify", "This is the liver of the patient.", "This is the liver of the patient."),
    ("location", "The liver is in the upper left", "The liver is in the upper left of the image."),
    ("location", "It lies in the upper left part of the image..", "It lies in the upper left part of the image."),
    ("describe", "  the liver is   smooth;", "The liver is smooth."),
])
def test_answer_normalisation(question_type, answer, expected):
    result = _answer(question_type, answer)
    assert result.accepted, result.violation
    assert result.output.final_answer == expected


@pytest.mark.parametrize("answer, expected", [
    ("left", "The liver is in the left part of the image."),
    ("(B)", "The liver is in the right part of the image."),
    ("c.", "The liver is in the center of the image."),
    ("The liver is located centrally, in the central part of the image", "The liver is located centrally, in the "
     "central part of the image."),
])
def test_location_choice_answers_become_sentences(answer, expected):
    """Bare words and choice letters become sentences; a direction inside the target's name does not count."""
    result = _answer("location_choice", answer, choices=("left", "right", "center"))
    assert result.accepted and result.output.final_answer == expected


@pytest.mark.parametrize("question_type, answer, choices, fragment", [
    ("yes_no", "Probably visible.", (), "must start with Yes or No"),
    ("location_choice", "It is on the left, not the right.", ("left", "right", "center"), "names left and right"),
    ("location_choice", "It is at the top.", ("left", "right", "center"), "names none"),
    ("location", "The liver is visible.", (), "image-space position"),
])
def test_unfixable_answers_fail_round_six(question_type, answer, choices, fragment):
    result = _answer(question_type, answer, choices=choices)
    assert not result.accepted and result.round == "answer_format" and fragment in result.violation


def test_retry_prompt_grows_stricter_and_refuses_accepted_results():
    rejected = gate.check("nope", ORGAN)
    assert "All earlier rules" not in gate.retry_prompt(rejected, 1)
    assert "All earlier rules" in gate.retry_prompt(rejected, 3)
    with pytest.raises(ValueError):
        gate.retry_prompt(gate.check(_raw(), ORGAN), 1)


def test_gate_accepts_a_parsed_dict():
    result = gate.check({"final_answer": "smooth", "reasoning_chain": CLEAN_CHAIN}, ORGAN)
    assert result.accepted and result.output.final_answer == "Smooth."


def test_direction_in_the_target_name_is_not_a_choice():
    context = GateContext("location_choice", "left kidney", "organ", False, ("left", "right", "center"))
    result = gate.check(_raw(answer="The left kidney is in the right part of the image.", chain=["x."]), context)
    assert result.accepted, result.violation


# ------------------------------------------------------- vocabulary and grammar rounds (API teachers too)
def _context(target="liver", modality="CT", question_type="describe", target_type="organ"):
    return GateContext(question_type, target, target_type, normal_anatomy=False, modality=modality)


@pytest.mark.parametrize("target, modality, chain, fragment", [
    ("liver", "CT", ["A hyperechoic region is seen.", "Its margin is smooth."], "'hyperechoic'"),
    ("liver", "ultrasound", ["It is hypodense to the spleen.", "Its margin is smooth."], "'hypodense'"),
    ("brain", "CT", ["Its signal intensity is high.", "Smooth."], "'signal intensity'"),
    ("lung", "MRI", ["The region shows greater lucency.", "Smooth."], "'lucency'"),
    ("lung opacity", "X-Ray", ["A hazy area of greater lucency.", "Smooth."], "contradicts the lung opacity"),
    ("COVID-19 infection", "X-Ray", ["Both lung fields are radiolucent.", "x."], "'radiolucent' contradicts"),
    ("pneumothorax", "X-Ray", ["An area of increased opacity.", "x."], "'increased opacity' contradicts"),
    ("kidney cyst", "ultrasound", ["A hyperechoic focus.", "x."], "'hyperechoic' contradicts"),
])
def test_vocabulary_round_rejects_wrong_modality_words_and_contradicted_names(target, modality, chain, fragment):
    result = gate.check(_raw(answer="It is visible.", chain=chain), _context(target, modality))
    assert not result.accepted and result.round == "vocabulary" and fragment in result.violation, result.violation
    assert "modality" in gate.retry_prompt(result, attempt=1)


@pytest.mark.parametrize("target, modality, chain", [
    ("lung opacity", "X-Ray", ["A hazy area of greater opacity, without lucency.", "Its margin is ill-defined."]),
    ("liver", "CT", ["It is hyperdense, with higher attenuation than the spleen.", "Smooth."]),
    ("tumor", "ultrasound", ["A hypoechoic, round mass.", "Posterior acoustic enhancement."]),
    ("enhancing tumor", "MRI", ["It is hyperintense on this sequence.", "Irregular margin."]),
    ("non-enhancing tumor", "MRI", ["It is hypointense on this sequence.", "Irregular margin."]),
    ("liver", "", ["A hyperechoic region: no modality given, no vocabulary check.", "x."]),
])
def test_vocabulary_round_accepts_the_modality_s_own_words(target, modality, chain):
    result = gate.check(_raw(answer="It is visible.", chain=chain), _context(target, modality))
    assert result.accepted, result.violation


@pytest.mark.parametrize("target, answer, chain, fragment", [
    ("liver", "The liver is a oval structure.", ["x.", "y."], "'a oval' (write 'an oval')"),
    ("liver", "It has a irregular margin.", ["x.", "y."], "'a irregular'"),
    ("liver", "It is seen.", ["An large organ.", "y."], "'An large' (write 'a large')"),
    ("liver", "It is seen.", ["It lies in a upper part of the image.", "y."], "'a upper'"),
    ("lung", "It is seen.", ["There are two separate region.", "y."], "'two separate region'"),
    ("lung", "It is seen.", ["There is two regions, one per side.", "y."], "'There is two'"),
    ("lung", "It is seen.", ["Two separate regions is visible.", "y."], "'Two separate regions is'"),
    ("lungs", "The lungs is visible.", ["x.", "y."], "'The lungs is' (the lungs is plural)"),
    ("kidney", "It is seen.", ["The kidney are bright.", "y."], "(the kidney is singular)"),
    ("neoplastic cells", "It is seen.", ["The neoplastic cells has dark nuclei.", "y."],
     "'The neoplastic cells has'"),
])
def test_grammar_round_rejects_wrong_articles_and_agreement(target, answer, chain, fragment):
    result = gate.check(_raw(answer=answer, chain=chain), _context(target))
    assert not result.accepted and result.round == "grammar" and fragment in result.violation, result.violation
    assert "grammatical" in gate.retry_prompt(result, attempt=1)


@pytest.mark.parametrize("target, answer, chain", [
    ("liver", "An enlarged liver is not seen; it is a uniform, unilateral, one-sided organ.",
     ["An MRI-like appearance with an X-ray-like density and an H&E-stained look.", "A European convention."]),
    ("kidney", "Both the liver and the kidney are visible.",
     ["One of the two regions is larger; the gap between the two regions is narrow.", "Type A cells, grade A."]),
    ("lungs", "The lungs are visible.", ["There are a few small regions.", "Several region types are seen."]),
    ("neoplastic cells", "The neoplastic cells are scattered.", ["They are dark.", "Each has a nucleus."]),
    ("lungs", "The centre of the lungs is in the middle part of the image.", ["x.", "y."]),
    ("liver", "It is seen.", ["A usual appearance, a useful sign, a uterus-like shape, an hour.", "An 8 mm focus."]),
])
def test_grammar_round_leaves_correct_english_alone(target, answer, chain):
    result = gate.check(_raw(answer=answer, chain=chain), _context(target))
    assert result.accepted, result.violation


def test_identify_answers_of_plural_targets_are_expanded_in_the_plural():
    context = GateContext("identify", "neoplastic cells", "other", normal_anatomy=False)
    result = gate.check(_raw(answer="neoplastic cells", chain=["Dark cells fill the image."]), context)
    assert result.accepted and result.output.final_answer == "The main structures shown are the neoplastic cells."


def test_a_closed_answer_the_mask_contradicts_is_rejected_by_the_ground_truth_round():
    """Nothing held an API teacher's closed answers to the mask: "Yes" to a lesion the image does not show, or the
    wrong side, became the record's (and the test split's) gold answer."""
    chain = ["The structure lies in the left third of the image."]
    yes_no = GateContext("yes_no", "liver", "organ", normal_anatomy=True, expected_answer="no")
    result = gate.check(_raw(answer="Yes, the liver lies in the left half of the image.", chain=chain), yes_no)
    assert not result.accepted and result.round == "ground_truth" and "says 'yes'" in result.violation
    assert result.rounds_passed == gate.ROUNDS.index("ground_truth") == len(gate.ROUNDS) - 1
    assert "ground_truth" in gate.retry_prompt(result, attempt=1)
    assert gate.check(_raw(answer="No, the liver lies in the right half of the image.", chain=chain), yes_no).accepted
    choice = GateContext("location_choice", "left kidney", "organ", normal_anatomy=True, choices=("left", "right",
                                                                                                   "center"),
                         expected_answer="right")
    wrong = gate.check(_raw(answer="left", chain=chain), choice)
    assert wrong.round == "ground_truth" and "'left'" in wrong.violation and "'right'" in wrong.violation
    assert gate.check(_raw(answer="The left kidney is in the right part of the image.", chain=chain), choice).accepted
    # Without a verdict (open questions, a location choice no third answers) the round checks nothing.
    unchecked = GateContext("yes_no", "liver", "organ", normal_anatomy=True)
    assert gate.check(_raw(answer="Yes.", chain=chain), unchecked).accepted
