"""The quality gate every teacher output passes through: the six rounds of App. A.3 and three more.

Rounds, in order; the first that fails names the violation and the sample is retried or rejected:
  1 json_schema          strict JSON object with exactly `final_answer` (str) and `reasoning_chain` (list of str);
                         no code fences, no extra text
  2 annotation_leakage   no word betraying the teacher-only view (mask, overlay, segmentation, highlighted, ...)
  3 pathology_terms      for normal anatomy only (App. A.2, "Dataset-specific adaptations"): no lesion/mass/...
  4 spatial_convention   image-space wording only: no "patient's left", "anatomical right", ...
  5 vocabulary           (not in the paper) contrast words of the sample's modality only ("hyperechoic" is not a
                         CT word), and none that contradicts the target's name (a "lung opacity" with "lucency");
                         vital_jax.data.vocabulary. Skipped when the context names no modality.
  6 grammar              (not in the paper) a/an, counts with plural nouns, "there is/are", verbs agreeing with
                         the target's name ("the lungs is"); vital_jax.data.wording
  7 step_count           len(reasoning_chain) within the question type's K range (Table 4)
  8 answer_format        the final answer normalised by question type: yes/no casing, bare choices and letters
                         expanded into sentences, short identify answers expanded, image-space phrasing for
                         locations, one final period; an answer that cannot be normalised is a violation.
  9 ground_truth         (not in the paper, which shows the teacher the mask "for internal correctness") a closed
                         answer (yes/no, location choice) must be the one the mask decides
                         (`geometry_teacher.mask_verdict`, given as GateContext.expected_answer); an API teacher
                         answering "yes" about a lesion the image does not show would otherwise label it present.
The same gate serves the API teacher and the offline geometry teacher (vital_jax.data.geometry_teacher), so
both are held to the same wording.
"""

from __future__ import annotations

import dataclasses
import json
import re

from vital_jax.data import questions
from vital_jax.data.records import STEP_RANGES
from vital_jax.data.vocabulary import vocabulary_problems
from vital_jax.data.wording import decapitalize, grammar_problems, is_plural

ROUNDS = ("json_schema", "annotation_leakage", "pathology_terms", "spatial_convention", "vocabulary", "grammar",
          "step_count", "answer_format", "ground_truth")
ANSWER_KEY, CHAIN_KEY = "final_answer", "reasoning_chain"

# Annotation-leakage terms (round 2): anything that reveals the teacher saw a marked-up image or hidden labels.
LEAKAGE_TERMS = (
    "mask", "masks", "masked", "masking", "overlay", "overlays", "overlaid", "segmentation", "segmented",
    "annotation", "annotations", "annotated", "highlighted", "highlighting", "highlight", "label", "labels",
    "labeled", "labelled", "ground truth", "ROI", "region of interest",
    "bounding box", "red region", "red area", "red overlay", "red color", "red colour", "red zone", "red tint",
    "yellow contour", "yellow outline", "yellow line", "yellow border", "colored region", "coloured region",
    "shaded region", "marked region", "marked area", "marking", "markings", "teacher",
    "metadata", "provided target", "given target", "target identity", "as indicated",
    "drawn contour", "drawn outline", "outlined region", "outlined area", "contoured region", "hidden target",
)
# Not forbidden alone, being ordinary radiology wording: "contour" ("a smooth contour"), "outlined" ("well
# outlined"), "hidden" ("partly hidden behind the ribs"), "marker" ("a tumour marker"); forbidden only in the
# phrases above, which speak of the teacher's marks.
# Pathology-style terms (round 3), forbidden only when the target is normal anatomy.
PATHOLOGY_TERMS = (
    "lesion", "lesions", "mass", "masses", "tumor", "tumors", "tumour", "tumours", "nodule", "nodules", "cyst",
    "cysts", "cystic", "calcification", "calcifications", "calcified", "inflammation", "inflamed", "inflammatory",
    "malignant", "malignancy", "benign", "metastasis", "metastases", "metastatic", "carcinoma", "cancer",
    "neoplasm", "neoplastic", "abnormal", "abnormality", "abnormalities", "pathology", "pathological", "necrosis",
    "necrotic", "edema", "oedema", "hemorrhage", "haemorrhage", "infarct", "infarction", "fibrosis", "cirrhosis",
    "stenosis", "thrombus", "abscess", "lymphadenopathy", "enlarged", "enlargement", "disease", "diseased",
)
# Patient-space / radiological-convention wording (round 4).
SPATIAL_PATTERNS = (
    r"\b(?:patient|subject)(?:'s|’s|s')?[\s-]+(?:own\s+)?(?:left|right)\b",
    r"\b(?:left|right)\s+(?:side\s+)?of\s+the\s+(?:patient|subject|body)\b",
    r"\b(?:anatomic(?:al)?|radiologic(?:al)?)(?:ally)?[\s-]+(?:left|right)\b",
    r"\bpatient[\s-]+space\b",
    r"\b(?:contralateral|ipsilateral)\b",
)
_DIRECTION_WORDS = r"\b(?:left|right|upper|lower|center|centre|central|middle|top|bottom)\b"
_KIND_FOR_IDENTIFY = {"organ": "organ", "lesion": "abnormality", "other": "structure"}


def _term_regex(terms) -> re.Pattern:
    alternatives = sorted((re.escape(t).replace(r"\ ", r"\s+") for t in terms), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_LEAKAGE_RE = _term_regex(LEAKAGE_TERMS)
_PATHOLOGY_RE = _term_regex(PATHOLOGY_TERMS)
_SPATIAL_RE = re.compile("|".join(SPATIAL_PATTERNS), re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class GateContext:
    """What the gate must know about the sample: its question type, target, whether it is normal anatomy, the
    choices of a location choice, its modality ("" skips the vocabulary round) and the closed answer its mask
    decides ("yes" / "no" or the choice; None skips the ground_truth round)."""

    question_type: str
    target: str
    target_type: str
    normal_anatomy: bool
    choices: tuple[str, ...] = ()
    modality: str = ""
    expected_answer: str | None = None


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
    """A teacher's answer: `final_answer` and its reasoning chain (one string per latent step)."""

    final_answer: str
    reasoning_chain: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({ANSWER_KEY: self.final_answer, CHAIN_KEY: list(self.reasoning_chain)}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class GateResult:
    """`accepted` with the normalised `output`, or the failing `round` (one of ROUNDS) and its `violation`."""

    accepted: bool
    output: TeacherOutput | None = None
    round: str | None = None
    violation: str | None = None
    rounds_passed: int = 0


def _reject(round_name: str, violation: str) -> GateResult:
    return GateResult(accepted=False, round=round_name, violation=violation, rounds_passed=ROUNDS.index(round_name))


def parse_output(raw: str | dict) -> TeacherOutput | str:
    """Round 1: a TeacherOutput, or the violation as a string."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("```"):
            return "the output is wrapped in a Markdown code fence; return the bare JSON object only"
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            return f"the output is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(raw, dict):
        return f"the output must be a JSON object, got {type(raw).__name__}"
    keys = set(raw)
    if keys != {ANSWER_KEY, CHAIN_KEY}:
        missing, extra = sorted({ANSWER_KEY, CHAIN_KEY} - keys), sorted(keys - {ANSWER_KEY, CHAIN_KEY})
        parts = ([f"missing field(s) {missing}"] if missing else []) + ([f"unexpected field(s) {extra}"] if extra
                                                                         else [])
        return "the JSON object must have exactly the fields final_answer and reasoning_chain: " + "; ".join(parts)
    answer, chain = raw[ANSWER_KEY], raw[CHAIN_KEY]
    if not isinstance(answer, str) or not answer.strip():
        return "final_answer must be a non-empty string"
    if not isinstance(chain, list) or not all(isinstance(s, str) and s.strip() for s in chain):
        return "reasoning_chain must be a list of non-empty strings"
    return TeacherOutput(final_answer=answer.strip(), reasoning_chain=tuple(" ".join(s.split()) for s in chain))


def _texts(output: TeacherOutput) -> list[str]:
    return [output.final_answer, *output.reasoning_chain]


def _found(regex: re.Pattern, output: TeacherOutput) -> list[str]:
    hits = []
    for text in _texts(output):
        for match in regex.finditer(text):
            term = " ".join(match.group(0).lower().split())
            if term not in hits:
                hits.append(term)
    return hits


def _problems(find, output: TeacherOutput) -> list[str]:
    out = []
    for text in _texts(output):
        out += [p for p in find(text) if p not in out]
    return out


def _sentence(text: str) -> str:
    """Collapse whitespace, capitalise the first letter, end with exactly one period."""
    text = " ".join(text.split())
    text = re.sub(r"[\s.!?;:,]+$", "", text)
    return text[:1].upper() + text[1:] + "." if text else text


def _choice_phrase(choice: str) -> str:
    return "the center of the image" if choice == "center" else f"the {choice} part of the image"


def normalize_answer(answer: str, context: GateContext) -> str:
    """Round 6: the answer in the standard form for its question type; ValueError names what cannot be fixed."""
    text = " ".join(answer.split())
    bare = re.sub(r"[\s.!?;:,()\[\]]+", " ", text).strip().lower()
    qtype = context.question_type
    if qtype == "yes_no":
        match = re.match(r"^(yes|no)\b[\s.!,;:]*(.*)$", text, re.IGNORECASE)
        if not match:
            raise ValueError("a yes/no answer must start with Yes or No")
        rest = match.group(2).strip()
        head = match.group(1).capitalize()
        first, _, others = rest.partition(" ")
        return _sentence(f"{head}, {' '.join(filter(None, (decapitalize(first), others)))}" if rest else head)
    if qtype == "location_choice":
        if not context.choices:
            raise ValueError("a location_choice sample needs its choices")
        letters = {chr(ord("a") + i): c for i, c in enumerate(context.choices)}
        if bare in letters or bare in context.choices:
            choice = letters.get(bare, bare)
            return _sentence(f"The {context.target} is in {_choice_phrase(choice)}")
        named = questions.named_choices(text, context.choices, context.target)
        if len(named) != 1:
            what = "none" if not named else " and ".join(named)
            raise ValueError(f"the answer must name exactly one of {', '.join(context.choices)} (it names {what})")
        return _sentence(text)
    if qtype == "identify" and len(bare.split()) < 4:
        # Lower-cased word by word: "Liver" -> "liver", but "COVID-19 infection" keeps its acronym.
        words = [decapitalize(w) for w in re.sub(r"[\s.!?;:,()\[\]]+", " ", text).split()]
        name = re.sub(r"^(?:the|a|an) ", "", " ".join(words), flags=re.IGNORECASE)
        kind = _KIND_FOR_IDENTIFY[context.target_type]
        if is_plural(name):
            return _sentence(f"The main {'abnormalities' if kind == 'abnormality' else kind + 's'} shown are the "
                             f"{name}")
        return _sentence(f"The main {kind} shown is the {name}")
    if qtype == "location":
        if not re.search(_DIRECTION_WORDS, text, re.IGNORECASE):
            raise ValueError("a location answer must give an image-space position (left, right, upper, lower, "
                             "center)")
        if not re.search(r"\bimage\b", text, re.IGNORECASE):
            text = re.sub(r"[\s.!?;:,]+$", "", text) + " of the image"
    return _sentence(text)


def _closed_reading(answer: str, context: GateContext) -> str | None:
    """The short answer of a normalised closed answer (`questions.closed_answer`'s reading): "yes" / "no", or the
    one choice it names of the question's choices."""
    if context.question_type == "yes_no":
        return questions.closed_answer("yes_no", "", answer)[0]
    named = questions.named_choices(answer, context.choices, context.target)
    return named[0] if len(named) == 1 else None


def check(raw: str | dict, context: GateContext) -> GateResult:
    """Run the nine rounds (module docstring) on a raw teacher output (JSON text or a parsed dict) and return the
    first violation or the accepted, normalised output."""
    if context.question_type not in STEP_RANGES:
        raise ValueError(f"unknown question type {context.question_type!r}")
    parsed = parse_output(raw)
    if isinstance(parsed, str):
        return _reject("json_schema", parsed)
    leaks = _found(_LEAKAGE_RE, parsed)
    if leaks:
        return _reject("annotation_leakage", "forbidden annotation-related wording: " + ", ".join(
            repr(t) for t in leaks))
    if context.normal_anatomy:
        terms = _found(_PATHOLOGY_RE, parsed)
        if terms:
            return _reject("pathology_terms", f"pathology wording for a normal {context.target}: " + ", ".join(
                repr(t) for t in terms))
    spatial = _found(_SPATIAL_RE, parsed)
    if spatial:
        return _reject("spatial_convention", "patient-space wording (use image-space left/right/upper/lower): "
                       + ", ".join(repr(t) for t in spatial))
    words = _problems(lambda text: vocabulary_problems(text, context.modality, context.target), parsed)
    if words:
        return _reject("vocabulary", "; ".join(words))
    grammar = _problems(lambda text: grammar_problems(text, context.target), parsed)
    if grammar:
        return _reject("grammar", "; ".join(grammar))
    low, high = STEP_RANGES[context.question_type]
    steps = len(parsed.reasoning_chain)
    if not low <= steps <= high:
        wanted = f"exactly {low}" if low == high else f"{low} to {high}"
        return _reject("step_count", f"reasoning_chain has {steps} step(s); a {context.question_type} question "
                       f"needs {wanted}")
    try:
        answer = normalize_answer(parsed.final_answer, context)
    except ValueError as e:
        return _reject("answer_format", str(e))
    if context.expected_answer is not None:
        given = _closed_reading(answer, context)
        if given != context.expected_answer:
            return _reject("ground_truth", f"the final answer says {given!r}, but the target region in the image "
                           f"shows {context.expected_answer!r}")
    return GateResult(accepted=True, output=dataclasses.replace(parsed, final_answer=answer),
                      rounds_passed=len(ROUNDS))


_REMINDERS = {
    "json_schema": "Return only one JSON object with exactly two fields, final_answer (a string) and "
                   "reasoning_chain (a list of strings). No Markdown, no code fences, no text before or after it.",
    "ground_truth": "Look at the image again: the answer must state what the target region actually shows "
                    "(where it lies, how large it is, whether it is there at all), and the reasoning must lead "
                    "to it.",
    "annotation_leakage": "Write as if you saw only the raw, unannotated image. Never mention or imply masks, "
                          "overlays, colours added to the image, drawn contours or outlines, labels, annotations, "
                          "highlighted areas, or that the target was given to you.",
    "pathology_terms": "This target is normal anatomy. Describe only its normal appearance; do not use words such "
                       "as lesion, mass, tumor, nodule, cyst, abnormal or any diagnosis.",
    "spatial_convention": "Use image-space positions only (left, right, upper, lower, center of the image). Never "
                          "use patient-space or anatomical left/right.",
    "vocabulary": "Use the contrast words of this imaging modality only (CT: attenuation, hyperdense/hypodense; "
                  "X-ray: opacity/lucency; MRI: signal intensity, hyperintense/hypointense; ultrasound: "
                  "echogenicity, hyperechoic/hypoechoic; pathology: staining), and never a word that contradicts "
                  "the target's own name.",
    "grammar": "Write grammatical English: 'an' before a vowel sound and 'a' before a consonant sound, plural "
               "nouns after counts, and verbs that agree with their subject.",
    "step_count": "Give exactly the number of reasoning steps required for this question type.",
    "answer_format": "Make final_answer one complete sentence in the required form for this question type.",
}


def retry_prompt(result: GateResult, attempt: int) -> str:
    """The "strict rules" block appended for a regeneration (App. A.3): names the violation, demands a fresh
    answer, and grows stricter with the attempt number (1-based)."""
    if result.accepted or result.round is None:
        raise ValueError("retry_prompt needs a rejected GateResult")
    lines = [f"STRICT RULES (attempt {attempt + 1}): your previous output was rejected by the {result.round} "
             f"check: {result.violation}.",
             _REMINDERS[result.round],
             "Regenerate the whole output from scratch; do not edit or refer to the previous one."]
    if attempt >= 2:
        lines.append("All earlier rules still apply: strict JSON, image-space wording, no annotation words, "
                     "the exact reasoning-step count.")
    return "\n".join(lines)
