"""Question templates (App. A.1, Table 4) and train/val/test splits.

Six question categories, each with its reasoning depth K (App. A.2, "Question-type-aware prompting"):
  yes_no 1, identify 1, location_choice 1, location 2, describe 2-3, reasoning 3-4.
Templates are conditioned on the target type (organ / lesion / other) and the imaging modality. A `Question` is a
record without its answer and reasoning chain: the teacher fills those in (`Question.to_record`).
Everything is deterministic under the seed passed in.

Only questions the mask can answer are asked (geometry.py's location rule): a yes/no side question only when the
whole target lies in an outer third (so its half and its third agree), a location choice only along an axis
where all of the target's separate regions share one third (none for a target spread over several thirds both
ways: `make_question` returns None), and a brightness question only when the target clearly differs from its
surround in the direction its name allows (vital_jax.data.vocabulary). Articles and verbs agree with the target
name ("Is there an enhancing tumor", "Are the neoplastic cells").
"""

from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from typing import Iterable, Sequence

import numpy as np

from vital_jax.data import geometry, vocabulary
from vital_jax.data.records import (QUESTION_TYPES, SPLITS, STEP_RANGES, LineError, Record, RecordError,
                                    iter_jsonl, split_group, write_jsonl_atomic)
from vital_jax.data.wording import Subject, capitalize

QUESTIONS_FILE = "questions.jsonl"
LOCATION_CHOICES = {"horizontal": ("left", "right", "center"), "vertical": ("upper", "middle", "lower")}
CLOSED_TYPES = ("yes_no", "location_choice")  # the closed-ended question types (App. B.4)
# Area thresholds a yes/no size question may ask about, with their words.
SIZE_THRESHOLDS = ((0.05, "a twentieth"), (0.1, "a tenth"), (0.25, "a quarter"))

MODALITY_PHRASES = {"CT": "CT scan", "MRI": "MRI scan", "ultrasound": "ultrasound image", "X-Ray": "X-ray image",
                    "pathology": "histopathology image", "endoscope": "endoscopic image",
                    "fundus": "fundus photograph", "OCT": "OCT scan", "dermoscopy": "dermoscopic image"}
KIND_WORDS = {"organ": "organ", "lesion": "abnormality", "other": "structure"}

# Templates per question type; "{target}", "{image}" (modality phrase), "{kind}", "{where}" (geometry.where: "in the
# upper left part of the image", "across the upper two thirds of the image") and "{is}" (is/are, agreeing with the
# target name) are filled in. Keys "any" apply to every target type; a target type's own list is added to them.
_TEMPLATES = {
    "identify": {"any": ["What {kind} is shown {where} in this {image}?",
                         "Which {kind} can be seen {where} in this {image}?"]},
    "location": {"any": ["Where {is} the {target} located in this {image}?",
                         "In which part of the image {is} the {target} found?"],
                 "lesion": ["Where {is} the {target} located in this {image}?"]},
    "describe": {"any": ["Describe the appearance of the {target} in this {image}.",
                         "What are the visual characteristics of the {target} in this {image}?"],
                 "lesion": ["Describe the size, shape and margins of the {target} in this {image}."]},
    "reasoning": {"organ": ["Analyze the position, shape and appearance of the {target} relative to nearby "
                            "structures in this {image}."],
                  "lesion": ["Analyze the visual findings that distinguish the {target} from the surrounding "
                             "tissue in this {image}."],
                  "other": ["Analyze the visual features that identify the {target} in this {image}."]},
}


@dataclasses.dataclass(frozen=True)
class Question:
    """A student-visible question about one target of one image, before the teacher answers it.

    `latent_steps` is the requested K (within the type's range); `template` and `slots` say which template
    was used and its parameters (e.g. the side a yes/no question asks about), so the geometry teacher can answer
    without parsing text; `choices` are the options of a location_choice question; `group` is the volume or
    patient of the image ("" = the image is its own group; records.split_group), which splits keep whole.
    """

    id: str
    image: str
    mask: str
    question: str
    question_type: str
    latent_steps: int
    target: str
    target_type: str
    modality: str
    source: str
    normal_anatomy: bool
    template: str
    slots: dict = dataclasses.field(default_factory=dict)
    choices: tuple[str, ...] = ()
    split: str = "train"
    group: str = ""

    def to_record(self, answer: str, reasoning_chain: Sequence[str]) -> Record:
        """The finished record; `latent_steps` is the chain's length (the validated K, App. A.2)."""
        return Record(id=self.id, image=self.image, mask=self.mask, question=self.question, answer=answer,
                      reasoning_chain=tuple(reasoning_chain), latent_steps=len(reasoning_chain),
                      question_type=self.question_type, target=self.target, target_type=self.target_type,
                      modality=self.modality, source=self.source, split=self.split, roi_index=-1,
                      group=self.group)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["choices"] = list(self.choices)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Question":
        return cls(**{**data, "choices": tuple(data.get("choices", ()))})


def named_choices(answer: str, choices: Sequence[str], target: str = "") -> list[str]:
    """The choices an answer names, in `choices`' order. The target's own name may hold a direction ("left
    kidney"), so it does not choose; "central" / "centre" name "center"."""
    rest = re.sub(re.escape(target), " ", answer, flags=re.IGNORECASE) if target else answer
    words = set(re.findall(r"[a-z]+", rest.lower()))
    words |= {"center"} if words & {"central", "centre"} else set()
    return [c for c in choices if c in words]


def closed_answer(question_type: str, question: str, answer: str, target: str = "") -> tuple[str, tuple[str, ...]]:
    """(short answer, options) of a closed-ended record, the one reading the answer balancer, the in-domain
    benchmarks and MedSynapse-V's reward share: a yes/no answer ("Yes, the liver is visible.", which the quality
    gate makes start with Yes or No) is "yes" of ("yes", "no"); a location choice is the one choice its answer
    names of the choice set its question offers (`LOCATION_CHOICES`). ValueError says what cannot be read."""
    if question_type == "yes_no":
        word = re.match(r"\s*(yes|no)\b", answer, re.IGNORECASE)
        if not word:
            raise ValueError(f"yes_no answer does not start with yes or no: {answer!r}")
        return word.group(1).lower(), ("yes", "no")
    if question_type == "location_choice":
        asked = set(re.findall(r"[a-z]+", question.lower()))
        axes = [c for c in LOCATION_CHOICES.values() if set(c) <= asked]
        if len(axes) != 1:
            raise ValueError(f"location_choice question names no choice set: {question!r}")
        named = named_choices(answer, axes[0], target)
        if len(named) != 1:
            raise ValueError(f"location_choice answer must name exactly one of {', '.join(axes[0])}: {answer!r}")
        return named[0], axes[0]
    raise ValueError(f"{question_type!r} is not a closed-ended question type ({', '.join(CLOSED_TYPES)})")


def question_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by (seed, key), so one question's draws do not depend on which others exist."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def slug(text: str) -> str:
    """Lower-case identifier piece: "left heart ventricle" -> "left-heart-ventricle"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def target_keys(names: Iterable[str]) -> dict[str, str]:
    """The id piece of each distinct target name of one image: its `slug`, or, where several names share a slug
    ("left kidney", "Left_Kidney"), the slug with -1, -2, ... in the names' sorted order (skipping a suffixed
    slug another name already has), so the question ids of one image are unique by construction."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(set(names)):
        groups[slug(name)].append(name)
    keys, taken = {}, set(groups)
    for key, group in sorted(groups.items()):
        if len(group) == 1:
            keys[group[0]] = key
            continue
        n = 0
        for name in group:
            n += 1
            while f"{key}-{n}" in taken:
                n += 1
            keys[name] = f"{key}-{n}"
            taken.add(keys[name])
    return keys


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# |inside - surround| mean gray level (0..255) above which a target is clearly brighter or darker than its
# surround (the geometry teacher's "clearly" starts at 25).
CLEAR_CONTRAST = 25.0


def _presence(target: str, target_type: str, image: str) -> str:
    """"Is there a liver tumor visible...", "Is there an enhancing tumor...", "Are the lungs visible..."."""
    s = Subject(target)
    if target_type == "lesion":
        return f"{'Are there' if s.plural else 'Is there'} {s.indefinite} visible in this {image}?"
    return f"{capitalize(s.verb('is'))} the {target} visible in this {image}?"


def _yes_no(rng, target: str, target_type: str, image: str, geo: geometry.MaskGeometry,
            contrast: bool = False, modality: str = "") -> tuple[str, str, dict]:
    """A yes/no question whose answer the mask decides: side (only when the whole target lies in an outer third,
    geometry.side_of), size, presence, or (with `contrast`, only when the target is clearly brighter or darker
    than its surround, and not against what its name says on `modality`) brightness."""
    s = Subject(target)
    variants = ["presence"]
    direction = 1 if geo.contrast > 0 else -1
    if (contrast and abs(geo.contrast) >= CLEAR_CONTRAST
            and vocabulary.implied_contrast(target, modality) != -direction):
        variants.append("contrast")
    if geometry.side_of(geo, "horizontal"):
        variants.append("horizontal_side")
    if geometry.side_of(geo, "vertical"):
        variants.append("vertical_side")
    sizes = [(t, w) for t, w in SIZE_THRESHOLDS if not t / 1.5 < geo.area_fraction < t * 1.5]
    if sizes:
        variants.append("size")
    variant = _pick(rng, variants)
    be = capitalize(s.verb("is"))
    if variant == "contrast":
        return (f"{be} the {target} brighter than the tissue around {'them' if s.plural else 'it'} in the image?",
                "yes_no_contrast", {})
    if variant in ("horizontal_side", "vertical_side"):
        side = _pick(rng, ("left", "right") if variant == "horizontal_side" else ("upper", "lower"))
        return f"{be} the {target} located in the {side} half of the image?", "yes_no_side", {"side": side}
    if variant == "size":
        threshold, words = _pick(rng, sizes)
        return (f"{capitalize(s.verb('does'))} the {target} occupy more than {words} of the image area?",
                "yes_no_size", {"threshold": threshold})
    return _presence(target, target_type, image), "yes_no_presence", {}


def _clause(phrase: str) -> str:
    """A phrase with an inner comma ("across the lower two thirds of the image, within its central third") closes
    with one, so that what follows it in a template reads as a new clause."""
    return f"{phrase}," if "," in phrase else phrase


def make_question(question_type: str, *, image_id: str, image_path: str, mask_path: str, target: str,
                  target_type: str, modality: str, source: str, normal_anatomy: bool,
                  geo: geometry.MaskGeometry, rng: np.random.Generator, contrast_questions: bool = False,
                  target_key: str | None = None, group: str = "") -> Question | None:
    """One question of `question_type` about `target`, its K drawn from the type's range (Table 4); None for a
    location choice that the target cannot answer (its regions lie in different thirds along both axes).

    Its id is IMAGE__KEY__TYPE with KEY = `target_key` (from `target_keys`, unique within the image), else
    `slug(target)`.

    contrast_questions: yes/no questions may also ask whether the target is brighter than its surround (asked
    without naming the modality, so the image has to tell: a liver is brighter than its surround on CT, darker
    on T2 MRI)."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r} (expected one of {', '.join(QUESTION_TYPES)})")
    image_words = MODALITY_PHRASES[modality]
    low, high = STEP_RANGES[question_type]
    steps = int(rng.integers(low, high + 1))
    slots: dict = {}
    choices: tuple[str, ...] = ()
    be = Subject(target).verb("is")
    if question_type == "yes_no":
        text, template, slots = _yes_no(rng, target, target_type, image_words, geo, contrast_questions, modality)
    elif question_type == "location_choice":
        axes = tuple(a for a in ("horizontal", "vertical") if geometry.axis_third(geo, a) is not None)
        if not axes:
            return None
        axis = _pick(rng, axes) if len(axes) > 1 else axes[0]
        choices = LOCATION_CHOICES[axis]
        template, slots = "location_choice", {"axis": axis}
        text = (f"{capitalize(be)} the {target} in the left, right, or center of the image?" if axis == "horizontal"
                else f"{capitalize(be)} the {target} in the upper, middle, or lower part of the image?")
    else:
        table = _TEMPLATES[question_type]
        options = table.get("any", []) + table.get(target_type, [])
        index = int(rng.integers(len(options)))
        template = f"{question_type}_{index}"
        text = options[index].format(target=target, image=image_words, kind=KIND_WORDS[target_type],
                                     where=_clause(geometry.where(geo)), **{"is": be})
    return Question(id=f"{image_id}__{target_key or slug(target)}__{question_type}", image=image_path, mask=mask_path,
                    question=text, question_type=question_type, latent_steps=steps, target=target,
                    target_type=target_type, modality=modality, source=source, normal_anatomy=normal_anatomy,
                    template=template, slots=slots, choices=choices, group=group)


def absence_question(*, image_id: str, image_path: str, organ_mask_path: str, target: str, organ: str,
                     modality: str, source: str, target_key: str | None = None) -> Question:
    """"Is there a {target} visible in this {image}?" about a lesion the image does not show (answer: no).

    Worded exactly like the presence question about a lesion that is there, so only the image tells the two
    apart. Its mask is the organ the lesion would grow in (`organ`): the region a reader checks, and the ROI.
    """
    image_words = MODALITY_PHRASES[modality]
    return Question(id=f"{image_id}__{target_key or slug(target)}__yes_no", image=image_path, mask=organ_mask_path,
                    question=_presence(target, "lesion", image_words), question_type="yes_no",
                    latent_steps=STEP_RANGES["yes_no"][0], target=target, target_type="lesion", modality=modality,
                    source=source, normal_anatomy=False, template="yes_no_absent", slots={"organ": organ})


def assign_splits(questions: Sequence[Question], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> list[Question]:
    """Questions with `split` set, grouped by volume / patient (`records.split_group`: a question's `group`, else
    its image), so that one group never spans splits, stratified by (question type, modality). Neighbouring slices
    of one volume are near-duplicates: split by slice, test would hold slices all but seen in training.

    Groups are visited in a seeded random order; each goes to the split whose strata are least filled relative
    to their targets (fraction x stratum size), summed over the group's questions. Relative filling gives a
    small dataset a group in every split with a non-zero fraction before train takes the rest; where it does not
    (strata that only one group holds), a split left without a group takes one from the split holding the most,
    as long as there are at least as many groups as splits with a non-zero fraction.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    by_group: dict[str, list[Question]] = collections.defaultdict(list)
    for q in questions:
        by_group[split_group(q)].append(q)
    totals = collections.Counter((q.question_type, q.modality) for q in questions)
    assigned = [collections.Counter() for _ in SPLITS]
    order = sorted(by_group)
    np.random.default_rng(seed).shuffle(order)
    split_of: dict[str, str] = {}
    for group in order:
        strata = collections.Counter((q.question_type, q.modality) for q in by_group[group])
        scores = [sum(n * (1.0 - assigned[j][s] / (fractions[j] * totals[s])) for s, n in strata.items())
                  if fractions[j] > 0 else -np.inf for j in range(len(SPLITS))]
        # Ties go to the larger split, so tiny datasets fill train first.
        best = max(range(len(SPLITS)), key=lambda j: (scores[j], fractions[j], -j))
        assigned[best].update(strata)
        split_of[group] = SPLITS[best]
    # Strata held by one group only (every image its own modality) score all splits alike and ties go to train,
    # so a small dataset could land in train whole: give each split with a non-zero fraction a group while
    # another split has two, taking the donor's smallest group (the last visited among equals).
    wanted = [j for j in range(len(SPLITS)) if fractions[j] > 0]
    members = {j: [group for group in order if split_of[group] == SPLITS[j]] for j in wanted}
    for j in wanted:
        donor = max(wanted, key=lambda d: (len(members[d]), fractions[d]))
        if members[j] or len(members[donor]) < 2:
            continue
        group = min(reversed(members[donor]), key=lambda g: len(by_group[g]))
        members[donor].remove(group)
        members[j].append(group)
        split_of[group] = SPLITS[j]
    return [dataclasses.replace(q, split=split_of[split_group(q)]) for q in questions]


def write_questions(path: str, questions: Iterable[Question]) -> None:
    """Write questions as JSONL (atomically: temporary file, fsync, rename)."""
    write_jsonl_atomic(path, (q.to_dict() for q in questions))


def read_questions(path: str) -> list[Question]:
    """Questions from JSONL; errors name the file, line number and id."""
    out = []
    for number, data in iter_jsonl(path):
        if isinstance(data, LineError):
            raise RecordError(f"{path}:{number}: bad question line ({data})")
        try:
            out.append(Question.from_dict(data))
        except TypeError as e:
            raise RecordError(f"{path}:{number}: bad question line ({e})") from e
    return out
