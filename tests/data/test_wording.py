"""English helpers and modality vocabulary behind the teacher's text and the gate's wording rounds."""

from __future__ import annotations

import pytest

from vital_jax.data import vocabulary, wording


@pytest.mark.parametrize("phrase, expected", [
    ("enhancing tumor", "an"), ("oval structure", "an"), ("irregular margin", "an"), ("upper part", "an"),
    ("ultrasound image", "an"), ("uterus", "a"), ("unilateral finding", "a"), ("one-sided mass", "a"),
    ("European atlas", "a"), ("hour", "an"), ("heart", "a"), ("MRI scan", "an"), ("X-ray image", "an"),
    ("H&E stain", "an"), ("CT scan", "a"), ("FLAIR image", "a"), ("COVID-19 infection", "a"), ("8 mm focus", "an"),
    ("18 mm focus", "an"), ("5 mm focus", "a"),
])
def test_article_follows_the_sound(phrase, expected):
    assert wording.article(phrase) == expected


@pytest.mark.parametrize("name, plural", [
    ("neoplastic cells", True), ("lungs", True), ("kidneys", True), ("nuclei", True), ("metastases", True),
    ("pancreas", False), ("glomerulus", False), ("pelvis", False), ("abscess", False), ("lens", False),
    ("COVID-19 infection", False), ("glandular structure", False),
])
def test_plural_target_names(name, plural):
    assert wording.is_plural(name) == plural
    subject = wording.Subject(name)
    assert subject.verb("is") == ("are" if plural else "is")
    assert subject.verb("lies") == ("lie" if plural else "lies")
    assert subject.verb("occupies") == ("occupy" if plural else "occupies")


@pytest.mark.parametrize("target, modality, sign", [
    ("lung opacity", "X-Ray", 1), ("COVID-19 infection", "X-Ray", 1), ("pneumothorax", "X-Ray", -1),
    ("enhancing tumor", "MRI", 1), ("non-enhancing tumor", "MRI", 0), ("kidney cyst", "CT", -1),
    ("kidney cyst", "ultrasound", -1), ("liver", "CT", 0), ("nodule", "X-Ray", 1), ("nodule", "CT", 0),
])
def test_what_a_name_says_about_contrast(target, modality, sign):
    assert vocabulary.implied_contrast(target, modality) == sign
