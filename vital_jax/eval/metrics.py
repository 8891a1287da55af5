"""Answer normalisation and the scores of App. B.4: closed-ended accuracy, open-ended token F1, PMC-VQA letters.

How each example is scored is decided by its `BenchmarkExample.match` (set by the loader):
  "vqa"      closed-ended VQA-RAD / SLAKE / PathVQA: accuracy after `normalize_answer`. A yes/no question counts
             every example: a wrong yes/no answer and a prediction that says neither yes nor no are both wrong
             (LLaVA-Med's script drops wrong yes/no answers from the denominator; we do not).
  "letter"   multiple choice (PMC-VQA): the option letter parsed from free text (`parse_choice_letter`);
             an unparseable prediction is wrong.
  "exact"    in-domain closed-ended (MSD / BiomedParse test splits): the prediction is matched against the ground
             truth after lowercasing and whitespace normalisation (`in_domain_correct`).
  "f1"       open-ended: token-level F1 (bag of tokens, Counter intersection) and recall; `correct` is exact match.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
_WORD_TO_DIGIT = {word: str(i) for i, word in enumerate(NUMBER_WORDS)}
_ARTICLES = frozenset({"a", "an", "the"})
# Every ASCII punctuation mark but the decimal point, which is handled separately so "2.5" stays one number.
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")
MATCH_KINDS = ("vqa", "letter", "exact", "f1")
LETTERS = "ABCDEFGHIJ"


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (decimal points between digits stay), drop the articles a/an/the, write number
    words zero..twenty as digits ("Two." -> "2") and collapse whitespace."""
    text = str(text).lower()
    text = _PUNCT.sub(" ", text.replace("'", ""))
    text = _NON_DECIMAL_POINT.sub(" ", text)
    tokens = [_WORD_TO_DIGIT.get(t, t) for t in text.split() if t not in _ARTICLES]
    return " ".join(tokens)


def normalize_whitespace_lower(text: str) -> str:
    """The in-domain normalisation of App. B.4: lowercase and collapse whitespace; a final period (the dataset's
    answers are sentences ending in one) is dropped too."""
    return re.sub(r"[\s.]+$", "", " ".join(str(text).lower().split()))


def yes_no_of(text: str) -> str | None:
    """"yes" / "no" when the prediction says one of them: its first normalised token, or else the only one of the
    two it contains; None when it says neither (or both without leading with one)."""
    tokens = normalize_answer(text).split()
    if not tokens:
        return None
    if tokens[0] in ("yes", "no"):
        return tokens[0]
    found = {t for t in tokens if t in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def is_yes_no(answer: str) -> bool:
    return normalize_answer(answer) in ("yes", "no")


def closed_correct(prediction: str, answer: str) -> bool:
    """Closed-ended accuracy for one example after `normalize_answer`; yes/no answers via `yes_no_of`."""
    gold = normalize_answer(answer)
    if gold in ("yes", "no"):
        return yes_no_of(prediction) == gold
    return normalize_answer(prediction) == gold


def token_prf(prediction: str, answer: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of normalised bags of tokens; repeated tokens count with multiplicity (Counter
    intersection). An empty prediction scores 0."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return 0.0, 0.0, 0.0
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(gold)
    return precision, recall, 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answer: str) -> float:
    """Token-level F1 of App. B.4 (harmonic mean of token precision and recall)."""
    return token_prf(prediction, answer)[2]


_STRICT_LETTER = (
    re.compile(r"^\(?([A-J])\)?[.:)]?$", re.IGNORECASE),        # "B", "b", "(B)", "B.", "B)"
    re.compile(r"^\(([A-J])\)"),                                 # "(B) text"
    re.compile(r"^([A-J])\s*[.:)]"),                             # "B. text", "B: text", "B) text"
    # "Answer: B", "the answer is (b)", "option C"; a lowercase letter only when nothing follows it, so
    # "the answer is a large mass" is not read as A.
    re.compile(r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*"
               r"(?:\(([A-Ja-j])\)|([A-J])(?![A-Za-z])|([a-j])(?=\s*(?:$|[.,;)])))"),
)


def _strict_letter(text: str, n_options: int) -> int | None:
    text = text.strip()
    for pattern in _STRICT_LETTER:
        match = pattern.search(text)
        if match:
            index = LETTERS.index(next(g for g in match.groups() if g).upper())
            return index if index < n_options else None
    return None


def _option_mentioned(text: str, options: Sequence[str], normalize) -> int | None:
    """The option the prediction is, or else the only option it mentions (options contained in a longer mentioned
    option do not count: "CT" inside "CT with contrast")."""
    pred = normalize(text)
    norm = [normalize(o) for o in options]
    for i, o in enumerate(norm):
        if o and pred == o:
            return i
    padded = f" {pred} "
    hits = [i for i, o in enumerate(norm) if o and f" {o} " in padded]
    hits = [i for i in hits if not any(j != i and norm[i] != norm[j] and norm[i] in norm[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def parse_choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter ("A".."D") a free-text prediction picks, or None when it cannot be told.

    Accepted: "B", "(B)", "B.", "B. text", "B) text", "Answer: B", "The answer is (B)", "option B", and the text
    of an option itself (or a sentence mentioning exactly one option) -> its letter. A leading article ("A large
    mass") is not read as a letter: a bare leading letter needs a delimiter.
    """
    if not str(prediction).strip():
        return None
    index = _strict_letter(str(prediction), len(options))
    if index is None:
        index = _option_mentioned(str(prediction), options, normalize_answer)
    return None if index is None else LETTERS[index]


def choice_correct(prediction: str, answer_letter: str, options: Sequence[str]) -> bool:
    return parse_choice_letter(prediction, options) == answer_letter.strip().upper()


def in_domain_correct(prediction: str, answer: str, options: Sequence[str] = ()) -> bool:
    """In-domain closed-ended match (App. B.4): lowercase + whitespace normalised equality with the ground truth.

    With options (yes/no and choice questions), a prediction that is not verbatim an option is first resolved to
    one: an option letter ("B", "(B)", "Answer: B"), a leading yes/no ("Yes, the liver is visible." -> "yes"), or
    the only option it mentions; it is correct when that option is the ground truth.
    """
    gold = normalize_whitespace_lower(answer)
    if normalize_whitespace_lower(prediction) == gold:
        return True
    if not options:
        return False
    index = _strict_letter(str(prediction), len(options))
    norm = [normalize_whitespace_lower(o) for o in options]
    if index is None and set(norm) == {"yes", "no"}:
        said = yes_no_of(prediction)
        index = norm.index(said) if said else None
    if index is None:
        index = _option_mentioned(str(prediction), options, normalize_whitespace_lower)
    return index is not None and norm[index] == gold


@dataclasses.dataclass(frozen=True)
class ExampleScore:
    """One example's score: `correct` (exact/accuracy), `f1` and `recall` (token level; open-ended only, else
    None), and `parsed` (the letter or yes/no read from the prediction, when the metric reads one)."""

    correct: bool
    f1: float | None = None
    recall: float | None = None
    parsed: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def score_example(example, prediction: str) -> ExampleScore:
    """Score one prediction against one `BenchmarkExample` by its `match` kind (module docstring)."""
    prediction = "" if prediction is None else str(prediction)
    match = example.match
    if match == "f1":
        _, recall, f1 = token_prf(prediction, example.answer)
        correct = bool(normalize_answer(prediction)) and normalize_answer(prediction) == normalize_answer(
            example.answer)
        return ExampleScore(correct=correct, f1=f1, recall=recall)
    if match == "vqa":
        parsed = yes_no_of(prediction) if is_yes_no(example.answer) else None
        return ExampleScore(correct=closed_correct(prediction, example.answer), parsed=parsed)
    if match == "letter":
        letter = parse_choice_letter(prediction, example.options)
        return ExampleScore(correct=letter == example.answer.strip().upper(), parsed=letter)
    if match == "exact":
        return ExampleScore(correct=in_domain_correct(prediction, example.answer, example.options))
    raise ValueError(f"example {example.id!r}: unknown match kind {match!r} (expected one of {MATCH_KINDS})")


def _summary(scores: Sequence[ExampleScore], with_f1: bool = True) -> dict:
    n = len(scores)
    out = {"count": n, "accuracy": sum(s.correct for s in scores) / n if n else 0.0}
    f1s = [s.f1 for s in scores if s.f1 is not None]
    if f1s and with_f1:
        out["token_f1"] = sum(f1s) / len(f1s)
        out["token_recall"] = sum(s.recall for s in scores if s.recall is not None) / len(f1s)
    return out


def score(examples: Sequence, predictions: Sequence[str]) -> dict:
    """Scores of a benchmark run: overall and per answer type, with counts.

    Returns {"count", "overall": {count, accuracy}, "closed": {count, accuracy}, "open": {count, accuracy,
    token_f1, token_recall},
    "closed_yes_no": {...} (closed examples whose answer is yes/no, when there are any), "per_example":
    [ExampleScore, ...]}. `closed.accuracy` is Acc_closed and `open.token_f1` is Token-F1_open of Table 1;
    "overall.accuracy" counts open examples by exact match. Types with no examples are left out.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    per_example = [score_example(e, p) for e, p in zip(examples, predictions)]
    out = {"count": len(per_example), "overall": _summary(per_example, with_f1=False)}
    for answer_type in ("closed", "open"):
        chosen = [s for e, s in zip(examples, per_example) if e.answer_type == answer_type]
        if chosen:
            out[answer_type] = _summary(chosen)
    yes_no = [s for e, s in zip(examples, per_example)
              if e.answer_type == "closed" and e.match in ("vqa", "exact") and is_yes_no(e.answer)]
    if yes_no:
        out["closed_yes_no"] = _summary(yes_no)
    out["per_example"] = per_example
    return out


def headline(metrics: dict) -> dict:
    """The numbers a paper table reports: Acc_closed, Token-F1_open (as fractions), when present."""
    out = {}
    if "closed" in metrics:
        out["acc_closed"] = metrics["closed"]["accuracy"]
    if "token_f1" in metrics.get("open", {}):
        out["token_f1_open"] = metrics["open"]["token_f1"]
    return out
