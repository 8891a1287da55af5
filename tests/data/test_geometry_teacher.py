"""Geometry teacher: exactly K steps, answers that hand-built masks decide, gate-clean on every phantom target."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vital_jax.data import geometry, phantoms, questions
from vital_jax.data import quality_gate as gate
from vital_jax.data.geometry_teacher import GeometryTeacher
from vital_jax.data.records import QUESTION_TYPES, STEP_RANGES

SIZE = 120


def _disc(center, radius, size=SIZE):
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - center[0] * size) ** 2 + (xx - center[1] * size) ** 2 < (radius * size) ** 2


def _image(mask, inside=200, outside=60):
    return np.repeat(np.where(mask, inside, outside).astype(np.uint8)[..., None], 3, axis=-1)


def _question(question_type, mask, image, target="liver", target_type="organ", modality="CT", key="0", **fields):
    q = questions.make_question(question_type, image_id="a", image_path="i.png", mask_path="m.png", target=target,
                                target_type=target_type, modality=modality, source="test",
                                normal_anatomy=target_type == "organ", geo=geometry.measure(image, mask),
                                rng=questions.question_rng(0, key))
    return dataclasses.replace(q, **fields) if fields else q


def _run(q, image, mask):
    raw = GeometryTeacher().generate(q, image, mask)
    result = gate.check(raw, gate.GateContext(q.question_type, q.target, q.target_type, q.normal_anatomy, q.choices,
                                              q.modality))
    assert result.accepted, (q.question, result.violation, raw)
    return result.output


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_writes_exactly_k_steps_for_every_k(question_type):
    mask = _disc((0.3, 0.25), 0.12)
    image = _image(mask)
    low, high = STEP_RANGES[question_type]
    for k in range(low, high + 1):
        q = _question(question_type, mask, image, latent_steps=k)
        assert len(json.loads(GeometryTeacher().generate(q, image, mask))["reasoning_chain"]) == k
        assert len(_run(q, image, mask).reasoning_chain) == k


def test_location_is_in_image_space():
    mask = _disc((0.2, 0.8), 0.1)   # upper right of the picture
    image = _image(mask)
    out = _run(_question("location", mask, image), image, mask)
    assert out.final_answer == "The liver is located in the upper right part of the image."
    choice = _run(_question("location_choice", mask, image, slots={"axis": "horizontal"},
                            choices=("left", "right", "center")), image, mask)
    assert choice.final_answer == "The liver is in the right part of the image."
    central = _disc((0.5, 0.5), 0.1)
    assert _run(_question("location", central, _image(central)), _image(central), central).final_answer == (
        "The liver is located in the central part of the image.")


@pytest.mark.parametrize("side, verdict", [("left", "No"), ("right", "Yes"), ("upper", "Yes"), ("lower", "No")])
def test_yes_no_side_answers_follow_the_centroid(side, verdict):
    mask = _disc((0.2, 0.8), 0.1)
    image = _image(mask)
    q = _question("yes_no", mask, image, template="yes_no_side", slots={"side": side})
    assert _run(q, image, mask).final_answer.startswith(verdict + ",")


def test_size_follows_the_area_fraction():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 20:60] = True  # 2000 / 10000 = 20%
    image = _image(mask)
    q = _question("yes_no", mask, image, template="yes_no_size", slots={"threshold": 0.1})
    out = _run(q, image, mask)
    assert out.final_answer == "Yes, the liver occupies about 20% of the image area."
    q = _question("yes_no", mask, image, template="yes_no_size", slots={"threshold": 0.25})
    assert _run(q, image, mask).final_answer.startswith("No,")


def test_shape_margin_parts_and_contrast_wording():
    bar = np.zeros((SIZE, SIZE), bool)
    bar[55:65, 10:110] = True
    text = " ".join(_run(_question("describe", bar, _image(bar), latent_steps=3), _image(bar), bar).reasoning_chain)
    assert "long, narrow, horizontally oriented" in text and "higher attenuation" in text and "hyperdense" in text
    cross = np.zeros((SIZE, SIZE), bool)
    cross[50:70, 10:110] = True
    cross[10:110, 50:70] = True
    text = _run(_question("describe", cross, _image(cross)), _image(cross), cross).final_answer
    assert "irregular margin" in text
    two = _disc((0.3, 0.3), 0.1) | _disc((0.7, 0.7), 0.1)
    dark = _image(two, inside=30, outside=150)
    text = " ".join(_run(_question("reasoning", two, dark, modality="ultrasound"), dark, two).reasoning_chain)
    assert "two separate regions" in text and "hypoechoic" in text and "darker" in text
    disc = _disc((0.5, 0.5), 0.2)
    text = _run(_question("describe", disc, _image(disc)), _image(disc), disc).final_answer
    assert "round structure with a smooth, regular margin, homogeneous texture" in text


def test_every_phantom_target_passes_the_gate_for_every_question_type():
    for index, modality in enumerate(phantoms.PHANTOM_MODALITIES * 2):
        p = phantoms.make_phantom(modality, seed=0, index=index, size=128)
        image = np.repeat(p.image[..., None], 3, axis=-1)
        for name, mask in p.masks.items():
            for t in QUESTION_TYPES:
                q = _question(t, mask, image, target=name, target_type=phantoms.TARGET_TYPES[name],
                              modality=modality, key=f"{index}{name}")
                if q is None:  # a location choice about regions in different thirds both ways: not asked
                    assert t == "location_choice" and geometry.measure(image, mask).components > 1
                    continue
                out = _run(q, image, mask)
                assert len(out.reasoning_chain) == q.latent_steps
                assert GeometryTeacher().generate(q, image, mask) == GeometryTeacher().generate(q, image, mask)
