"""An offline, deterministic teacher that answers from the mask itself (no API, no downloads).

It writes exactly K = `question.latent_steps` reasoning steps and a final answer from image-space measurements of
the target (vital_jax.data.geometry): location from the centroid (upper/lower, left/right of the IMAGE), extent
and size from the area fraction, shape from elongation and circularity, margin regularity from solidity, and
intensity contrast and texture inside the target against a ring around it, worded per modality (density on CT,
signal on MRI, echogenicity on ultrasound, opacity on X-ray). Its output is the API teacher's JSON
(`{"final_answer": ..., "reasoning_chain": [...]}`) and goes through the same quality gate; it never uses
annotation words and never pathology words for normal anatomy.
"""

from __future__ import annotations

import threading

import numpy as np

from vital_jax.data import geometry
from vital_jax.data.geometry import MaskGeometry, region_phrase
from vital_jax.data.quality_gate import TeacherOutput
from vital_jax.data.questions import Question

# Modality -> (brighter wording, darker wording, the quality compared).
_CONTRAST_WORDS = {"CT": ("higher density", "lower density", "density"),
                   "MRI": ("higher signal intensity", "lower signal intensity", "signal intensity"),
                   "ultrasound": ("higher echogenicity", "lower echogenicity", "echogenicity"),
                   "X-Ray": ("greater opacity", "greater lucency", "opacity")}
_DEFAULT_CONTRAST = ("higher brightness", "lower brightness", "brightness")
_KIND = {"organ": "organ", "lesion": "abnormality", "other": "structure"}


def _percent(fraction: float) -> str:
    return "less than 1%" if fraction < 0.01 else f"about {round(100 * fraction)}%"


def _size_word(g: MaskGeometry) -> str:
    a = g.area_fraction
    return ("very small" if a < 0.01 else "small" if a < 0.05 else "moderate-sized" if a < 0.15
            else "large" if a < 0.35 else "very large")


def _shape(g: MaskGeometry) -> str:
    if g.elongation < 1.3:
        return "round" if g.circularity > 0.75 else "compact"
    base = "oval" if g.elongation < 2.0 else "elongated" if g.elongation < 3.5 else "long, narrow"
    return f"{base}, {g.major_axis}ly oriented"


def _margin(g: MaskGeometry) -> str:
    return ("smooth, regular" if g.solidity >= 0.93 else "mildly lobulated" if g.solidity >= 0.8
            else "irregular")


def _texture(g: MaskGeometry) -> str:
    return "homogeneous" if g.inside_std < 10 else "mildly heterogeneous" if g.inside_std < 25 else "heterogeneous"


def _contrast(g: MaskGeometry, modality: str) -> str:
    brighter, darker, quality = _CONTRAST_WORDS.get(modality, _DEFAULT_CONTRAST)
    c = g.contrast
    if abs(c) < 8:
        return f"{quality} similar to the adjacent tissue"
    degree = "slightly " if abs(c) < 25 else "clearly " if abs(c) < 60 else "much "
    word = brighter if c > 0 else darker
    tone = "brighter" if c > 0 else "darker"
    return f"{degree}{word} than the adjacent tissue ({tone} in the image)"


def _parts(g: MaskGeometry) -> str:
    return f", made of {g.components} separate parts" if g.components > 1 else ""


def _edges(g: MaskGeometry) -> str:
    top, left, bottom, right = g.bbox
    near = [name for name, gap in (("upper", top), ("left", left), ("lower", 1 - bottom), ("right", 1 - right))
            if gap < 0.05]
    if not near:
        return "It lies clear of the image borders, surrounded by adjacent tissue on all sides."
    return f"It extends close to the {' and '.join(near)} border{'s' if len(near) > 1 else ''} of the image."


class GeometryTeacher:
    """Answers a `Question` from its image (uint8 (H, W, 3)) and target mask (bool (H, W)); deterministic.

    Measurements are cached per (question.image, question.mask) path pair, since every target is asked several
    questions; the arrays passed in must be the contents of those files (as the distillation runner loads them).
    """

    name = "geometry"

    def __init__(self):
        self._cache: dict[tuple[str, str], MaskGeometry] = {}
        self._lock = threading.Lock()

    def _measure(self, question: Question, image: np.ndarray, mask: np.ndarray) -> MaskGeometry:
        key = (question.image, question.mask)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = geometry.measure(image, mask)
            with self._lock:
                self._cache[key] = cached
        return cached

    def generate(self, question: Question, image: np.ndarray, mask: np.ndarray, feedback: str | None = None) -> str:
        """The teacher JSON for `question`. `feedback` (a retry note) is ignored: the output is deterministic."""
        del feedback
        g = self._measure(question, image, mask)
        steps = question.latent_steps
        answer, chain = _ANSWERERS[question.question_type](question, g)
        if len(chain) != steps:
            raise AssertionError(f"{question.id}: geometry teacher wrote {len(chain)} steps, K={steps}")
        return TeacherOutput(final_answer=answer, reasoning_chain=tuple(chain)).to_json()


def _where(g: MaskGeometry) -> str:
    return region_phrase(g.vertical, g.horizontal)


def _yes_no(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    t = q.target
    if q.template == "yes_no_side":
        side = q.slots["side"]
        if side in ("left", "right"):
            position, edge, actual = g.centroid[1], "left", "left" if g.centroid[1] < 0.5 else "right"
            axis = "width"
        else:
            position, edge, actual = g.centroid[0], "top", "upper" if g.centroid[0] < 0.5 else "lower"
            axis = "height"
        step = (f"The centre of the {t} lies at {_percent(position)} of the image {axis} from the {edge} edge, "
                f"in {_where(g)}.")
        verdict = "Yes" if actual == side else "No"
        return f"{verdict}, the {t} lies in the {actual} half of the image.", [step]
    if q.template == "yes_no_size":
        threshold = float(q.slots["threshold"])
        step = f"The {t} covers {_percent(g.area_fraction)} of the image area, a {_size_word(g)} extent."
        verdict = "Yes" if g.area_fraction > threshold else "No"
        return f"{verdict}, the {t} occupies {_percent(g.area_fraction)} of the image area.", [step]
    if q.template == "yes_no_contrast":
        step = f"The {t} shows {_contrast(g, q.modality)}."
        verdict, relation = ("Yes", "brighter") if g.contrast > 0 else ("No", "darker")
        return f"{verdict}, the {t} is {relation} than the tissue around it in the image.", [step]
    if q.template == "yes_no_absent":  # g measures the organ the lesion would be in
        organ = q.slots["organ"]
        quality = _CONTRAST_WORDS.get(q.modality, _DEFAULT_CONTRAST)[2]
        step = (f"The {organ} in {_where(g)} has a {_texture(g)} interior with no focal region of different "
                f"{quality}.")
        return f"No, there is no {t} visible in this image.", [step]
    article = "a" if q.target_type == "lesion" else "the"
    step = (f"A {_size_word(g)} {_shape(g)} structure with {_contrast(g, q.modality)} is visible in {_where(g)}, "
            f"consistent with {article} {t}.")
    return f"Yes, {article} {t} is visible in {_where(g)}.", [step]


def _identify(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    step = (f"In {_where(g)} there is a {_size_word(g)} {_shape(g)} structure with a {_margin(g)} margin and "
            f"{_contrast(g, q.modality)}; its position and appearance fit the {q.target}.")
    return f"The main {_KIND[q.target_type]} shown there is the {q.target}.", [step]


def _location_choice(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    if q.slots["axis"] == "horizontal":
        choice, position, edge, axis = g.horizontal, g.centroid[1], "left", "width"
    else:
        choice, position, edge, axis = g.vertical, g.centroid[0], "top", "height"
    phrase = "the center of the image" if choice == "center" else f"the {choice} part of the image"
    step = (f"The centre of the {q.target} lies at {_percent(position)} of the image {axis} from the {edge} edge, "
            f"which falls in {phrase}.")
    return f"The {q.target} is in {phrase}.", [step]


def _location(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    top, left, bottom, right = g.bbox
    steps = [f"A {_size_word(g)} {_shape(g)} structure with {_contrast(g, q.modality)} is identified as the "
             f"{q.target}.",
             f"Its centre lies in {_where(g)}, and it spans {_percent(right - left)} of the image width and "
             f"{_percent(bottom - top)} of its height."]
    return f"The {q.target} is located in {_where(g)}.", steps


def _describe(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    first = f"The {q.target} lies in {_where(g)} and occupies {_percent(g.area_fraction)} of the image area."
    shape = f"It has a {_shape(g)} shape with a {_margin(g)} margin{_parts(g)}"
    appearance = f"Its internal texture is {_texture(g)}, with {_contrast(g, q.modality)}."
    steps = [first, f"{shape}." if q.latent_steps == 3 else f"{shape}; {appearance[0].lower()}{appearance[1:]}"]
    if q.latent_steps == 3:
        steps.append(appearance)
    answer = (f"The {q.target} appears as a {_size_word(g)} {_shape(g)} structure with a {_margin(g)} margin, "
              f"{_texture(g)} texture and {_contrast(g, q.modality)}.")
    return answer, steps


def _reasoning(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    steps = [f"The {q.target} is found in {_where(g)}.",
             f"It is {_size_word(g)}, covering {_percent(g.area_fraction)} of the image, with a {_shape(g)} "
             f"shape{_parts(g)}.",
             f"It has a {_margin(g)} margin, and its {_texture(g)} interior shows {_contrast(g, q.modality)}."]
    if q.latent_steps == 4:
        steps.append(_edges(g))
    answer = (f"The {q.target} is a {_size_word(g)} {_shape(g)} structure in {_where(g)} with a {_margin(g)} "
              f"margin and {_contrast(g, q.modality)}.")
    return answer, steps


_ANSWERERS = {"yes_no": _yes_no, "identify": _identify, "location_choice": _location_choice,
              "location": _location, "describe": _describe, "reasoning": _reasoning}
