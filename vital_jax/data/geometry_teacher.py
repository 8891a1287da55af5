"""An offline, deterministic teacher that answers from the mask itself (no API, no downloads).

It writes exactly K = `question.latent_steps` reasoning steps and a final answer from image-space measurements of
the target (vital_jax.data.geometry): location from the centroid (upper/lower, left/right of the IMAGE, by the
thirds rule of geometry.py; half-image words only for a yes/no side question, with the midline stated), extent
and size from the area fraction, shape from elongation and circularity, margin regularity from solidity, and
intensity contrast and texture inside the target against a ring around it, in the modality's own words
(vital_jax.data.vocabulary: attenuation on CT, opacity/lucency on X-ray, signal intensity on MRI, echogenicity
on ultrasound, staining on pathology) and never against the target's name. A target made of several separate
regions (both lungs, scattered glands) is described as such, region by region, or as scattered across the
thirds it covers, never as one shape at their common centre. Articles and verb number follow the target's name
(vital_jax.data.wording). Its output is the API teacher's JSON (`{"final_answer": ..., "reasoning_chain":
[...]}`) and goes through the same quality gate; it never uses annotation words and never pathology words for
normal anatomy.
"""

from __future__ import annotations

import threading

import numpy as np

from vital_jax.data import geometry, vocabulary
from vital_jax.data.geometry import MaskGeometry, Part, Shape, region_core, region_phrase, where
from vital_jax.data.quality_gate import TeacherOutput
from vital_jax.data.questions import Question
from vital_jax.data.wording import Subject, capitalize, count_word, with_article

_KIND = {"organ": "organ", "lesion": "abnormality", "other": "structure"}
_KINDS = {"organ": "organs", "lesion": "abnormalities", "other": "structures"}


def _percent(fraction: float) -> str:
    return "less than 1%" if fraction < 0.01 else f"about {round(100 * fraction)}%"


def _size_word(area_fraction: float) -> str:
    a = area_fraction
    return ("very small" if a < 0.01 else "small" if a < 0.05 else "moderate-sized" if a < 0.15
            else "large" if a < 0.35 else "very large")


def _shape(s: Shape) -> str:
    if s.elongation < 1.3:
        return "round" if s.circularity > 0.75 else "compact"
    base = "oval" if s.elongation < 2.0 else "elongated" if s.elongation < 3.5 else "long, narrow"
    return f"{base}, {s.major_axis}ly oriented"


def _margin(s: Shape) -> str:
    return ("smooth, regular" if s.solidity >= 0.93 else "mildly lobulated" if s.solidity >= 0.8
            else "irregular")


def _whole(g: MaskGeometry) -> Shape:
    return Shape(g.elongation, g.major_axis, g.circularity, g.solidity)


def _texture(g: MaskGeometry) -> str:
    return "homogeneous" if g.inside_std < 10 else "mildly heterogeneous" if g.inside_std < 25 else "heterogeneous"


def _contrast(g: MaskGeometry, q: Question, short: bool = False) -> str:
    """How the target contrasts with the ring around it, in the modality's words; never against its name.
    `short` (final answers) leaves out the parenthesis with the modality term and the brightness."""
    words = vocabulary.words_for(q.modality)
    c = g.contrast
    if abs(c) < 8:
        term = f" ({words.similar_term})" if words.similar_term and not short else ""
        return f"{words.quality} similar to {words.surround}{term}"
    direction = 1 if c > 0 else -1
    if vocabulary.implied_contrast(q.target, q.modality) == -direction:
        # The surround says the opposite of the name (a COVID-19 mask over both lung fields is darker than the
        # chest wall around it): the quality without a direction.
        return f"{'uniform' if g.inside_std < 10 else 'varying'} {words.quality}"
    if (q.modality == "ultrasound" and direction < 0 and abs(c) >= 25
            and g.inside_mean < vocabulary.ANECHOIC_LEVEL):
        return "no internal echoes" + ("" if short else " (anechoic, darker)")
    degree = "slightly " if abs(c) < 25 else "clearly " if abs(c) < 60 else "much "
    word, term = (words.brighter, words.bright_term) if direction > 0 else (words.darker, words.dark_term)
    tone = "brighter" if direction > 0 else "darker"
    note = ("" if short or words.quality == "brightness" else f" ({term}, {tone})" if term
            else f" ({tone} in the image)")
    return f"{degree}{word} than {words.surround}{note}"


def _edges(g: MaskGeometry, s: Subject) -> str:
    top, left, bottom, right = g.bbox
    near = [name for name, gap in (("upper", top), ("left", left), ("lower", 1 - bottom), ("right", 1 - right))
            if gap < 0.05]
    it = capitalize(s.it)
    if not near:
        return f"{it} {s.verb('lies')} clear of the image borders, surrounded by adjacent tissue on all sides."
    return (f"{it} {s.verb('extends')} close to the {' and '.join(near)} border{'s' if len(near) > 1 else ''} of "
            f"the image.")


# ------------------------------------------------------------------------------- several separate regions
def _multi(g: MaskGeometry) -> bool:
    return g.components > 1


def _regions(g: MaskGeometry) -> str:
    """"two separate regions"."""
    return f"{count_word(g.components)} separate regions"


def _all(n: int) -> str:
    return "both" if n == 2 else f"all {count_word(n)}"


def _relation(g: MaskGeometry) -> str:
    """", on either side of the vertical midline" for two regions that straddle it (or the horizontal one)."""
    if g.components != 2:
        return ""
    if geometry.straddles(g, "horizontal"):
        return ", on either side of the vertical midline"
    if geometry.straddles(g, "vertical"):
        return ", above and below the horizontal midline"
    return ""


def _part_place(p: Part) -> str:
    return region_phrase(p.vertical, p.horizontal)


def _places(g: MaskGeometry) -> str:
    """Where each region lies: "one lies in the left part of the image and one in the right part of the image",
    "both lie in the central part of the image"; scattered: where and the largest one's place."""
    if g.scattered:
        return f"they are scattered {where(g)}, the largest in {_part_place(g.parts[0])}"
    places = [_part_place(p) for p in geometry.part_order(g)]
    if len(set(places)) == 1:
        return f"{_all(len(places))} lie in {places[0]}"
    items = [f"one lies in {places[0]}"] + [f"one in {place}" for place in places[1:]]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sizes(g: MaskGeometry) -> str:
    """How big each region is, tied to its place: "the one in the left part of the image covers about 20% of the
    image area and the one in the right part about 17%"; scattered: the largest and the smallest."""
    if g.scattered:
        return (f"the largest covers {_percent(g.parts[0].area_fraction)} of the image area and the smallest "
                f"{_percent(g.parts[-1].area_fraction)}")
    ordered = geometry.part_order(g)
    places = [region_core(p.vertical, p.horizontal) for p in ordered]
    sizes = [_percent(p.area_fraction) for p in ordered]
    if len(set(places)) < len(places):  # two in one part of the image: place does not tell them apart
        if len(ordered) == 2:
            return f"one covers {sizes[0]} of the image area and the other {sizes[1]}"
        return f"they cover {', '.join(sizes[:-1])} and {sizes[-1]} of the image area"
    items = [f"the one in the {places[0]} part of the image covers {sizes[0]} of the image area"] + [
        f"the one in the {place} part {size}" for place, size in zip(places[1:], sizes[1:])]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _where_scattered(g: MaskGeometry) -> str:
    """where(g), adding the largest region's place for a scattered target (so a location names a side)."""
    if not g.scattered:
        return where(g)
    return f"{where(g)}, the largest in {_part_place(g.parts[0])}"


def _part_shapes(g: MaskGeometry) -> str:
    """"both are elongated, vertically oriented, with smooth, regular margins" or, when they differ (or are
    scattered), the largest one's."""
    shapes = [(_shape(p.shape), _margin(p.shape)) for p in g.parts]
    if not g.scattered and len(set(shapes)) == 1:
        shape, margin = shapes[0]
        return f"{_all(len(shapes))} are {shape}, with {margin} margins"
    shape, margin = shapes[0]
    return f"the {'larger' if len(shapes) == 2 else 'largest'} is {shape}, with {with_article(margin)} margin"


def _positions(g: MaskGeometry, index: int) -> str:
    """Where the centre (or each region's centre) lies along one axis: "at about 35%", "at about 28% and about
    73%", "between about 40% and about 62%" (four or more regions)."""
    xs = [p.centroid[index] for p in geometry.part_order(g)] if _multi(g) else [g.centroid[index]]
    if len(xs) > 3:
        return f"between {_percent(min(xs))} and {_percent(max(xs))}"
    words = [_percent(x) for x in xs]
    return "at " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1])


class GeometryTeacher:
    """Answers a `Question` from its image (uint8 (H, W, 3)) and target mask (bool (H, W)); deterministic.

    Measurements are cached per (question.image, question.mask) path pair, since every target is asked several
    questions; the arrays passed in must be the contents of those files (as the distillation runner loads them).
    """

    name = "geometry"

    def __init__(self):
        self._cache: dict[tuple[str, str], MaskGeometry] = {}
        self._lock = threading.Lock()

    def measure(self, question: Question, image: np.ndarray, mask: np.ndarray) -> MaskGeometry:
        """`geometry.measure` of the question's image and mask, cached by their paths (also the quality gate's
        measurement when this teacher answers: `teacher.distill`)."""
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
        g = self.measure(question, image, mask)
        steps = question.latent_steps
        answer, chain = _ANSWERERS[question.question_type](question, g)
        if len(chain) != steps:
            raise AssertionError(f"{question.id}: geometry teacher wrote {len(chain)} steps, K={steps}")
        return TeacherOutput(final_answer=answer, reasoning_chain=tuple(chain)).to_json()


def mask_verdict(q: Question, g: MaskGeometry) -> str | None:
    """The short answer the mask decides for a closed question (`questions.closed_answer`'s reading): "yes" / "no"
    for a yes/no question, the choice of a location choice; None for an open question, or a location choice whose
    regions lie in different thirds (no choice is right). What this teacher answers, and what the quality gate
    holds every teacher's closed answers to (its ground_truth round)."""
    if q.question_type == "location_choice":
        return geometry.axis_third(g, q.slots["axis"])
    if q.question_type != "yes_no":
        return None
    if q.template == "yes_no_side":
        if geometry.straddles(g, "horizontal" if q.slots["side"] in ("left", "right") else "vertical"):
            return "no"
        return "yes" if _side(q, g) == q.slots["side"] else "no"
    if q.template == "yes_no_size":
        return "yes" if g.area_fraction > float(q.slots["threshold"]) else "no"
    if q.template == "yes_no_contrast":
        return "yes" if g.contrast > 0 else "no"
    if q.template == "yes_no_absent":  # the mask is the organ the lesion would grow in
        return "no"
    return "yes"  # presence: the mask is the target


def _side(q: Question, g: MaskGeometry) -> str:
    """The half (of the pair `q.slots["side"]` belongs to) that holds the target's first part's centre."""
    index, words = (1, ("left", "right")) if q.slots["side"] in ("left", "right") else (0, ("upper", "lower"))
    first = g.parts[0].centroid[index] if _multi(g) else g.centroid[index]
    return words[0] if first < 0.5 else words[1]


def _structure(g: MaskGeometry) -> str:
    """"a small round structure" (one region) or "two separate regions"."""
    if _multi(g):
        return _regions(g)
    return with_article(f"{_size_word(g.area_fraction)} {_shape(_whole(g))} structure")


def _yes_no(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    the = s.the
    if q.template == "yes_no_side":
        return _yes_no_side(q, g, s)
    if q.template == "yes_no_size":
        extent = f"{with_article(_size_word(g.area_fraction))} extent"
        if _multi(g):
            step = (f"Together, the {_regions(g)} of {the} cover {_percent(g.area_fraction)} of the image area, "
                    f"{extent}.")
        else:
            step = f"{capitalize(the)} {s.verb('covers')} {_percent(g.area_fraction)} of the image area, {extent}."
        verdict = mask_verdict(q, g).capitalize()
        return f"{verdict}, {the} {s.verb('occupies')} {_percent(g.area_fraction)} of the image area.", [step]
    if q.template == "yes_no_contrast":
        step = f"{capitalize(the)} {s.verb('shows')} {_contrast(g, q)}."
        verdict = mask_verdict(q, g).capitalize()
        relation = "brighter" if verdict == "Yes" else "darker"
        around = "them" if s.plural else "it"
        return f"{verdict}, {the} {s.verb('is')} {relation} than the tissue around {around} in the image.", [step]
    if q.template == "yes_no_absent":  # g measures the organ the lesion would be in
        organ = Subject(q.slots["organ"])
        quality = vocabulary.words_for(q.modality).quality
        step = (f"{capitalize(organ.the)}, {where(g)}, {organ.verb('has')} {with_article(_texture(g))} interior "
                f"with no focal region of different {quality}.")
        there = "there are no" if s.plural else "there is no"
        return f"No, {there} {q.target} visible in this image.", [step]
    named = s.indefinite if q.target_type == "lesion" else the
    if _multi(g):
        step = (f"{capitalize(_regions(g))} with {_contrast(g, q)} are visible {_where_scattered(g)}, consistent "
                f"with {named}.")
    else:
        step = f"{capitalize(_structure(g))} with {_contrast(g, q)} is visible {where(g)}, consistent with {named}."
    return f"Yes, {named} {s.verb('is')} visible {where(g)}.", [step]


def _yes_no_side(q: Question, g: MaskGeometry, s: Subject) -> tuple[str, list[str]]:
    """Halves, stated by the midline; asked only where the half and the third agree (geometry.side_of)."""
    side = q.slots["side"]
    if side in ("left", "right"):
        axis, index, dimension, edge, midline = "horizontal", 1, "width", "left", "vertical midline"
        below, above, words = "left of", "right of", ("left", "right")
    else:
        axis, index, dimension, edge, midline = "vertical", 0, "height", "top", "horizontal midline"
        below, above, words = "above", "below", ("upper", "lower")
    the = s.the
    at = _positions(g, index)
    if geometry.straddles(g, axis):
        step = (f"{capitalize(the)} {s.verb('is')} made up of {_regions(g)} on both sides of the {midline} of "
                f"the image, their centres {at} of the image {dimension} from the {edge} edge.")
        return (f"No, {the} {s.verb('is')} not confined to the {side} half of the image: {s.it} {s.verb('lies')} "
                f"on both sides of its {midline}."), [step]
    actual = _side(q, g)
    relation = below if actual == words[0] else above
    if _multi(g):
        step = (f"{capitalize(_all(g.components))} regions of {the} lie {relation} the {midline} of the "
                f"image, their centres {at} of the image {dimension} from the {edge} edge.")
    else:
        step = (f"The centre of {the} lies {at} of the image {dimension} from the {edge} edge, {relation} the "
                f"{midline} of the image.")
    return f"{mask_verdict(q, g).capitalize()}, {the} {s.verb('lies')} in the {actual} half of the image.", [step]


def _identify(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    if _multi(g):
        step = (f"{capitalize(where(g))}, there are {_regions(g)} with {_contrast(g, q)}; their position and "
                f"appearance fit {s.the}.")
    else:
        step = (f"{capitalize(where(g))}, there is {_structure(g)} with "
                f"{with_article(_margin(_whole(g)))} margin and {_contrast(g, q)}; its position and appearance "
                f"fit {s.the}.")
    if s.plural:
        return f"The main {_KINDS[q.target_type]} shown there are {s.the}.", [step]
    return f"The main {_KIND[q.target_type]} shown there is {s.the}.", [step]


def _choice_phrase(choice: str) -> str:
    return "the center of the image" if choice == "center" else f"the {choice} part of the image"


def _location_choice(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    axis = q.slots["axis"]
    index, dimension, edge = (1, "width", "left") if axis == "horizontal" else (0, "height", "top")
    choice = mask_verdict(q, g)
    positions = [p.centroid[index] for p in geometry.part_order(g)] if _multi(g) else [g.centroid[index]]
    at = _positions(g, index)
    if choice is None:  # regions in different thirds: no single choice is right (the gate rejects the answer)
        thirds = list(dict.fromkeys(geometry.third(x, axis) for x in positions))
        step = (f"{capitalize(s.the)} {s.verb('is')} made up of {_regions(g)} whose centres lie {at} of the "
                f"image {dimension} from the {edge} edge, in different thirds of it.")
        return (f"{capitalize(s.the)} {s.verb('is')} in " + " and ".join(_choice_phrase(t) for t in thirds) + ".",
                [step])
    third = f"{'central' if choice == 'center' else choice} third"
    if _multi(g):
        step = (f"{capitalize(_all(g.components))} regions of {s.the} have their centres in the {third} of the "
                f"image {dimension} ({at.removeprefix('at ')} from the {edge} edge): {_choice_phrase(choice)}.")
    else:
        step = (f"The centre of {s.the} lies {at} of the image {dimension} from the {edge} edge, in its {third}: "
                f"{_choice_phrase(choice)}.")
    return f"{capitalize(s.the)} {s.verb('is')} in {_choice_phrase(choice)}.", [step]


def _location(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    top, left, bottom, right = g.bbox
    span = f"{_percent(right - left)} of the image width and {_percent(bottom - top)} of its height"
    if _multi(g):
        steps = [f"{capitalize(_regions(g))} with {_contrast(g, q)} are identified as {s.the}.",
                 f"{capitalize(_places(g))}; together they span {span}."]
        place = (f"in {_regions(g)} scattered {_where_scattered(g)}" if g.scattered else where(g))
        return f"{capitalize(s.the)} {s.verb('is')} located {place}.", steps
    steps = [f"{capitalize(_structure(g))} with {_contrast(g, q)} is identified as {s.the}.",
             f"{capitalize(s.its)} centre lies {where(g)}, and {s.it} {s.verb('spans')} {span}."]
    return f"{capitalize(s.the)} {s.verb('is')} located {where(g)}.", steps


def _describe(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    texture, contrast = _texture(g), _contrast(g, q)
    appearance = f"{capitalize(s.its)} internal texture is {texture}, with {contrast}."
    if _multi(g):
        first = (f"{capitalize(s.the)} {s.verb('appears')} as {_regions(g)} {_where_scattered(g)}{_relation(g)}, "
                 f"together covering {_percent(g.area_fraction)} of the image area.")
        shape = f"{capitalize(_sizes(g))}; {_part_shapes(g)}" if q.latent_steps == 3 else capitalize(_part_shapes(g))
        answer = (f"{capitalize(s.the)} {s.verb('appears')} as {_regions(g)} {_where_scattered(g)}, with "
                  f"{_contrast(g, q, short=True)}.")
    else:
        first = (f"{capitalize(s.the)} {s.verb('lies')} {where(g)} and {s.verb('occupies')} "
                 f"{_percent(g.area_fraction)} of the image area.")
        shape = (f"{capitalize(s.it)} {s.verb('has')} {with_article(_shape(_whole(g)))} shape with "
                 f"{with_article(_margin(_whole(g)))} margin")
        answer = (f"{capitalize(s.the)} {s.verb('appears')} as {_structure(g)} with "
                  f"{with_article(_margin(_whole(g)))} margin, {texture} texture and {_contrast(g, q, short=True)}.")
    if q.latent_steps == 3:
        return answer, [first, f"{shape}.", appearance]
    return answer, [first, f"{shape}; {appearance[0].lower()}{appearance[1:]}"]


def _reasoning(q: Question, g: MaskGeometry) -> tuple[str, list[str]]:
    s = Subject(q.target)
    texture, contrast = _texture(g), _contrast(g, q)
    if _multi(g):
        steps = [f"{capitalize(s.the)} {s.verb('is')} found {_where_scattered(g)}, as {_regions(g)}"
                 f"{_relation(g)}.",
                 f"Together the regions cover {_percent(g.area_fraction)} of the image; {_sizes(g)}.",
                 f"{capitalize(_part_shapes(g))}; their interiors are {texture}, with {contrast}."]
        answer = (f"{capitalize(s.the)} {s.verb('appears')} as {_regions(g)} {_where_scattered(g)}, with "
                  f"{_contrast(g, q, short=True)}.")
    else:
        whole = _whole(g)
        steps = [f"{capitalize(s.the)} {s.verb('is')} found {where(g)}.",
                 f"{capitalize(s.it)} {s.verb('is')} {_size_word(g.area_fraction)}, covering "
                 f"{_percent(g.area_fraction)} of the image, with {with_article(_shape(whole))} shape.",
                 f"{capitalize(s.it)} {s.verb('has')} {with_article(_margin(whole))} margin, and {s.its} {texture} "
                 f"interior shows {contrast}."]
        answer = (f"{capitalize(s.the)} {s.verb('appears')} as {_structure(g)} {where(g)} with "
                  f"{with_article(_margin(whole))} margin and {_contrast(g, q, short=True)}.")
    if q.latent_steps == 4:
        steps.append(_edges(g, s))
    return answer, steps


_ANSWERERS = {"yes_no": _yes_no, "identify": _identify, "location_choice": _location_choice,
              "location": _location, "describe": _describe, "reasoning": _reasoning}
