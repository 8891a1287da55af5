"""Answer normalisation and the scores of App. B.4: closed-ended accuracy, open-ended token F1, PMC-VQA letters.

One normaliser (`normalize_answer`) is applied identically to the ground truth, the prediction and the options.
How each example is scored is decided by its `BenchmarkExample.match` (set by the loader):
  "vqa"      closed-ended VQA-RAD / SLAKE / PathVQA (`closed_correct`): a yes/no answer by the polarity the
             prediction states (`yes_no_of`; stating both, or hedging, is neither); any other answer by normalised
             equality, or when the prediction names the answer (its words, or its distinguishing words when the
             question offers alternatives: "On the right" to "left or right side?") and nothing competing with it
             (another alternative the question offers, another option, another side / modality / plane), no "or",
             no negation. Every example counts: a wrong yes/no answer and a prediction that says neither yes nor no
             are both wrong (LLaVA-Med's script drops wrong yes/no answers from the denominator; we do not).
  "letter"   multiple choice (PMC-VQA): the option letter parsed from free text (`parse_choice_letter`);
             an unparseable prediction is wrong.
  "exact"    in-domain closed-ended (MSD / BiomedParse test splits, `in_domain_correct`): normalised equality with
             the ground truth, or the option the prediction resolves to (a letter when the prompt listed the
             options under letters, a stated yes/no, the only option it mentions). When the ground truth is a bare
             choice ("right") the question's target name is removed from answer, options and prediction alike, so
             "The left kidney is in the right part" says "right".
  "f1"       open-ended: token-level F1 (bag of tokens, Counter intersection) and recall; `correct` is exact match.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Iterable, Sequence

from vital_jax.data.records import QUESTION_TYPES

UNIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
              "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS_WORDS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
              "ninety": 90}
_UNIT_VALUE = {word: i for i, word in enumerate(UNIT_WORDS)}
# British and other variant spellings, written one way on both sides. "central" is the adjective the in-domain
# answers use for the "center" choice ("in the central part of the image").
SPELLING_VARIANTS = {"centre": "center", "central": "center", "centred": "centered", "tumour": "tumor",
                     "tumours": "tumors", "oedema": "edema", "haemorrhage": "hemorrhage", "haematoma": "hematoma",
                     "oesophagus": "esophagus", "grey": "gray", "fibre": "fiber", "xray": "x ray"}
# Typographic apostrophes, quotes and dashes as their ASCII forms (the hyphen then splits words: "x-ray" -> "x ray").
_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
                              "\u201c": '"', "\u201d": '"', "\u2010": "-", "\u2011": "-", "\u2012": "-",
                              "\u2013": "-", "\u2014": "-", "\u2212": "-"})
_ARTICLES = frozenset({"a", "an", "the"})
# Every ASCII punctuation mark but the decimal point, which is handled separately so "2.5" stays one number.
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Signs that carry meaning survive punctuation, so "HER2+" is not "HER2-" nor ">5 mm" "<5 mm". A + or - (or the
# minus sign) right after a code -- a token with a digit or a capital, or of at most 3 letters ("HER2", "ER", "pr")
# -- and not followed by a word character stays on it: "ER+ PR-" -> "er+ pr-", so a bag of tokens tells it from
# "ER- PR+". A hyphen inside a word still splits it ("T2-weighted", "non-contrast"); a suspended one ("pre- and
# post-contrast", "T1- or T2-weighted") and a dash after a word ("the lesion- single or ...") are punctuation. A
# minus before a number that follows no token stays on the number ("-5 HU"; "5-10 mm" is a range: "5 10"). En and
# em dashes are punctuation. Comparisons become words: "<5 mm" -> "less than 5 mm".
_SIGN_AFTER_TOKEN = re.compile(r"(?<![A-Za-z0-9])([A-Za-z0-9]+)([+\-\u2212])(?![A-Za-z0-9+\-\u2212])"
                               r"(?!\s*(?:(?:and|or|to)\b|&))", re.IGNORECASE)
_NEGATIVE_NUMBER = re.compile(r"(?<![A-Za-z0-9.])[\-\u2212](?=\.?\d)")
_PLUS_MARK, _MINUS_MARK = "\x01", "\x02"   # signs kept while punctuation is dropped
_COMPARISONS = (("<=", " at most "), ("\u2264", " at most "), (">=", " at least "), ("\u2265", " at least "),
                ("<", " less than "), (">", " more than "))
MATCH_KINDS = ("vqa", "letter", "exact", "f1")
LETTERS = "ABCDEFGHIJ"
YES_NO = ("yes", "no")


def _number_words(tokens: list[str]) -> list[str]:
    """"twenty one" / "twenty" / "seven" -> "21" / "20" / "7" (0..99)."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token in TENS_WORDS:
            value = TENS_WORDS[token]
            if i + 1 < len(tokens) and 1 <= _UNIT_VALUE.get(tokens[i + 1], 0) <= 9:
                value += _UNIT_VALUE[tokens[i + 1]]
                i += 1
            out.append(str(value))
        else:
            out.append(str(_UNIT_VALUE[token]) if token in _UNIT_VALUE else token)
        i += 1
    return out


def _is_code(token: str) -> bool:
    return len(token) <= 3 or any(c.isdigit() or c.isupper() for c in token)


def _marked_signs(text: str) -> str:
    for sign, words in _COMPARISONS:
        text = text.replace(sign, words)
    text = _SIGN_AFTER_TOKEN.sub(lambda m: m.group(1) + (_PLUS_MARK if m.group(2) == "+" else _MINUS_MARK)
                                 if _is_code(m.group(1)) else m.group(0), text)
    return _NEGATIVE_NUMBER.sub(_MINUS_MARK, text)


def _tokens(text: str) -> list[str]:
    text = _marked_signs(str(text)).translate(_TYPOGRAPHIC).lower()
    text = _PUNCT.sub(" ", text.replace("'", ""))
    text = _NON_DECIMAL_POINT.sub(" ", text).replace(_PLUS_MARK, "+").replace(_MINUS_MARK, "-")
    words = [w for t in text.split() if t not in _ARTICLES for w in SPELLING_VARIANTS.get(t, t).split()]
    return _number_words(words)


def _without_phrase(tokens: list[str], phrase: list[str]) -> list[str]:
    out, i, n = [], 0, len(phrase)
    while i < len(tokens):
        if n and tokens[i:i + n] == phrase:
            i += n
        else:
            out.append(tokens[i])
            i += 1
    return out


def normalize_answer(text: str, strip: Sequence[str] = ()) -> str:
    """The one answer normaliser, for ground truths, predictions and options alike.

    Signs stay on their token (`_SIGN_AFTER_TOKEN`): "HER2+" -> "her2+", "ER- PR+" -> "er- pr+", "-5 HU" -> "-5
    hu"; comparisons become words: "<5 mm" -> "less than 5 mm" (">", "<=", ">=": "more than", "at most", "at
    least"). Lowercase; typographic apostrophes / quotes / dashes as ASCII; drop apostrophes ("patient's" ->
    "patients") and other punctuation (a hyphen inside a word splits it: "T2-weighted" -> "t2 weighted"; decimal
    points between digits stay); drop the articles a/an/the;
    spelling variants one way (centre / central -> center, tumour -> tumor, ...); number words 0..99 as digits,
    compounds included ("Twenty-one" -> "21"); collapse whitespace. Each phrase of `strip` (normalised the same
    way, e.g. the question's target "left kidney") is removed wherever it occurs as whole words.
    """
    tokens = _tokens(text)
    for phrase in strip:
        tokens = _without_phrase(tokens, _tokens(phrase))
    return " ".join(tokens)


def _has_phrase(text: str, phrase: str) -> bool:
    return bool(phrase) and f" {phrase} " in f" {text} "


# ------------------------------------------------------------------------------------------------------ yes / no

_NEGATIONS = frozenset({"no", "not", "none", "absent", "absence", "without", "neither", "nor", "never", "nothing",
                        "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "didnt", "hasnt", "havent", "nowhere",
                        "negative", "nope"})
# Existence predicates and plain assent; not "shows" ("The image shows an aneurysm" may answer another question).
_AFFIRMATIONS = frozenset({"present", "seen", "visible", "noted", "identified", "evident", "observed", "detected",
                           "correct", "true", "yeah", "yep", "indeed", "affirmative", "positive"})
# A statement hedged with one of these does not answer yes or no ("I am not sure", "cannot be excluded").
_HEDGES = frozenset({"sure", "unsure", "certain", "uncertain", "unclear", "maybe", "perhaps", "possibly", "possible",
                     "probably", "likely", "unlikely", "unknown", "tell", "determine", "know", "cannot", "excluded",
                     "indeterminate", "equivocal", "difficult"})
# Words that end the leading clause: "A pneumothorax is present | with no mediastinal shift".
_CLAUSE_BREAKS = frozenset({"with", "without", "but", "although", "though", "while", "whereas", "except", "and",
                            "which", "that", "because", "however"})
_IDIOMS = ("no doubt", "no question")  # a leading "no" that affirms ("No doubt, yes.")


# Where a clause ends: punctuation or a slash ("Yes/No"). Line breaks are spaces by then.
_CLAUSE_END = r"[,;:.!?()/]"
# "no" as an answer of its own rather than a determiner ("No.", "yes or no", "Yes/No"; not "no effusion").
_STANDALONE_NO = re.compile(r"\bno\b(?=\s*(?:[,;:.!?)/]|-\s|$|or\b))")
_YES = re.compile(r"\byes\b")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.replace("'", ""))


def _leading_clause(text: str) -> list[str]:
    words = _words(re.split(_CLAUSE_END, text, maxsplit=1)[0])
    for i, word in enumerate(words):
        if i > 0 and word in _CLAUSE_BREAKS:
            return words[:i]
    return words


def _answer_clause(text: str, start: int) -> list[str]:
    """The words of the clause around position `start`, continued into the next clause when it is the bare answer
    word ("Yes, probably." is hedged; "Yes, there is a mass, likely a cyst" is not)."""
    clauses = re.split(_CLAUSE_END, text)
    ends = [m.end() for m in re.finditer(_CLAUSE_END, text)] + [len(text) + 1]
    index = next(i for i, end in enumerate(ends) if start < end)
    words = _words(clauses[index])
    if words in (["yes"], ["no"]) and index + 1 < len(clauses):
        words += _words(clauses[index + 1])
    return words


def _hedged(words: Iterable[str]) -> bool:
    return any(w in _HEDGES for w in words)


def yes_no_of(text: str) -> str | None:
    """"yes" / "no": the polarity the prediction states, or None when it states none, states both, or hedges.

    In order: a leading yes, or a leading no that stands alone ("No.", "No, the liver is normal") -- "no doubt" /
    "no question" leading are skipped; else a yes or a stand-alone no elsewhere ("I think yes", "the answer is
    no"); else the leading clause (up to the first punctuation mark or "with", "but", "and", ...): a negation
    ("There is no evidence of a mass", "Not present", "Absent") is no, an affirmation ("A pneumothorax is present
    with no mediastinal shift") is yes. So "Yes, there is no effusion" is yes: the leading word answers, the rest
    describes ("no" before a noun is not an answer).

    Ambiguous, None: both a yes and a stand-alone no anywhere ("Yes or no", "Yes/No", "Yes.\nNo.", "No/Yes",
    "maybe yes maybe no"). Hedged, None, on every path: a hedge word ("possibly", "probably", "not sure", "cannot
    be excluded", ...) in the clause that states the answer, taken on into the next clause when it is the bare
    word ("Possibly yes", "Yes, probably", "Probably not", "I am not sure").
    """
    text = " ".join(str(text).translate(_TYPOGRAPHIC).lower().split()).lstrip(" \"'([*-")
    for idiom in _IDIOMS:
        if re.match(rf"{idiom}\b", text):
            text = text[len(idiom):].lstrip(" ,;:.!-")
    yes, no = _YES.search(text), _STANDALONE_NO.search(text)
    if yes and no:
        return None
    said = yes or no
    if said:
        return None if _hedged(_answer_clause(text, said.start())) else said.group(0)
    clause = _leading_clause(text)
    if not clause or _hedged(clause):
        return None
    if any(w in _NEGATIONS for w in clause):
        return "no"
    if any(w in _AFFIRMATIONS for w in clause) or clause[:2] in (["there", "is"], ["there", "are"]):
        return "yes"
    return None


def is_yes_no(answer: str) -> bool:
    return normalize_answer(answer) in YES_NO


# ------------------------------------------------------------------------------------------ options and closed

def _resolve_option(pred: str, options: Sequence[str]) -> int | None:
    """The index of the (normalised) option the (normalised) prediction is, or else the only option it mentions
    as whole words; None when it mentions none or several, says "or", or negates outside the option's own words.
    Options contained in a longer mentioned option do not count ("CT" inside "CT with contrast")."""
    for i, o in enumerate(options):
        if o and pred == o:
            return i
    padded = f" {pred} "
    hits = [i for i, o in enumerate(options) if o and f" {o} " in padded]
    hits = [i for i in hits if not any(j != i and options[i] != options[j] and _has_phrase(options[j], options[i])
                                       for j in hits)]
    if len({options[i] for i in hits}) != 1:
        return None
    rest = padded.replace(f" {options[hits[0]]} ", " ").split()
    if "or" in rest or any(w in _NEGATIONS for w in rest):
        return None
    return hits[0]


_AUXILIARIES = frozenset({"is", "are", "was", "were", "be", "been", "am", "do", "does", "did", "has", "have", "had",
                          "can", "could", "would", "should", "will", "may", "might"})
# Words that frame a question's choice list and are never part of an alternative it offers: auxiliaries, wh-words,
# pronouns, the prepositions around a list ("on the left or right side OF the patient"), the image and the
# patient, participles after it ("... or MRI USED to take the image"), "just" / "only" ("multiple or just 1").
_SCAFFOLDING = _AUXILIARIES | {
    "what", "which", "where", "when", "who", "whom", "whose", "why", "how", "this", "that", "these", "those", "there",
    "it", "its", "they", "their", "you", "we", "i", "of", "in", "on", "at", "to", "from", "for", "by", "into", "onto",
    "than", "as", "about", "and", "image", "images", "patient", "patients", "seen", "shown", "located", "taken",
    "used", "found", "noted", "just", "only"}
_WH_WORDS = frozenset({"what", "which", "where", "when", "who", "whom", "whose", "why", "how"})
# Small answer vocabularies whose members exclude each other: a prediction naming the gold's member and another
# ("right and left", "CT, MRI") does not answer, whatever the question lists.
ANSWER_KINDS = (("left", "right"), ("ct", "mri", "x ray", "ultrasound", "pet"), ("axial", "sagittal", "coronal"),
                ("male", "female"), ("ap", "pa"))


def _choice_list(clause: str) -> list[list[str]]:
    """The alternatives of one clause holding "or", as lists of normalised words (rules: `question_alternatives`)."""
    pieces, separators = [], []
    for i, comma_piece in enumerate(clause.split(",")):
        for j, piece in enumerate(re.split(r"\bor\b", comma_piece)):
            if i or j:
                separators.append("or" if j else ",")
            pieces.append(normalize_answer(piece).split())
    last_or = max(i for i, s in enumerate(separators) if s == "or")
    first_or = separators.index("or")
    tail = pieces[last_or + 1]
    start = next((i for i, w in enumerate(tail) if w not in _SCAFFOLDING), len(tail))
    end = next((i for i in range(start + 1, len(tail)) if tail[i] in _SCAFFOLDING), len(tail))
    last = tail[start:end] or tail[:1]
    items = [p for p in pieces[first_or + 1:last_or + 1] if p]   # between the first and the last "or"
    items = [[w for w in p if w not in _SCAFFOLDING] or p for p in items]
    head = []
    for k in range(first_or, -1, -1):   # back from the first "or" over comma-separated items
        piece = pieces[k]
        if not piece:
            continue
        if not any(w in _SCAFFOLDING for w in piece):
            head.insert(0, piece)
        elif k == first_or or piece[0] not in _WH_WORDS:   # "Is this T1, T2 or FLAIR": the item ends the piece
            cut = max(i for i, w in enumerate(piece) if w in _SCAFFOLDING) + 1
            run = piece[cut:] or piece[-1:]
            if cut == 1 and piece[0] in _AUXILIARIES and len(run) > 1:   # "Is [the] CSF enhanced or ...": subject
                run = run[1:]
            longest = max(map(len, head + items + [last]))
            head.insert(0, run[max(len(run) - longest, 0):])
            break
        else:                            # "Where is the abnormality, left lung or right lung": not an item
            break
        if k == 0 or separators[k - 1] != ",":
            break
    alternatives = head + items + [last]
    if len(last) > 1:                    # "left or right side": "left side" or "right side"
        alternatives = [a + last[1:] if len(a) == 1 and a[0] not in last else a for a in alternatives]
    return [a for a in alternatives if any(w not in _SCAFFOLDING and w not in ("no", "not") for w in a)]


def question_alternatives(question: str) -> tuple[str, ...]:
    """The alternatives a question offers, as whole normalised phrases, in order (empty when it offers none).

    Each clause (up to ?, !, ;, :, or a full stop) holding "or" (or "vs", "versus") is read as a list whose items
    are separated by commas and "or", with the question's scaffolding (`_SCAFFOLDING`: auxiliaries, wh-words,
    pronouns, prepositions, "image", "patient", ...) left out:
      - the item after the last "or" runs up to the first scaffolding word ("right side | of the patient");
      - the item before the first "or" starts after the last scaffolding word of its piece ("on the | left"),
        without its first word when that follows the opening auxiliary ("Is the CSF | enhanced": the subject),
        and reaches back no further than the longest other item ("Is the stomach wall thickening symmetric or
        asymmetric" -> "symmetric"); comma-separated items before it are whole when they hold no scaffolding
        ("T1 weighted, T2 weighted, or FLAIR"), and a piece starting with a wh-word is the question, not an item
        ("Where is the abnormality, left lung or right lung?" -> ("left lung", "right lung"));
      - a one-word item takes the words after the last item's first word, as English elides them ("on the left or
        right side" -> ("left side", "right side"); "with or without contrast"; "multiple or just 1 metastatic
        focus" -> ("multiple metastatic focus", "1 metastatic focus")). Where that reading is wrong ("pneumonia or
        pleural effusion" -> "pneumonia effusion") the added words are shared, and shared words never tell
        alternatives apart (`closed_correct`);
      - items of scaffolding and negation only ("... or not") are dropped.
    """
    text = re.sub(r"\b(?:vs|versus)\b\.?", " or ", str(question).translate(_TYPOGRAPHIC).lower())
    out = []
    for clause in re.split(r"[?!;:]|\.(?!\d)", text):
        if re.search(r"\bor\b", clause):
            out += [" ".join(a) for a in _choice_list(clause)]
    return tuple(dict.fromkeys(a for a in out if a))


def _own_alternative(gold_words: set[str], alternatives: Sequence[str]) -> int | None:
    """The index of the alternative the answer is: the one sharing most words with it, then with fewest words of
    its own; None when it shares none or two alternatives tie."""
    keys = [(len(set(a.split()) & gold_words), -len(set(a.split()) - gold_words)) for a in alternatives]
    best = max(keys, default=(0, 0))
    return keys.index(best) if best[0] and keys.count(best) == 1 else None


def _named_competitor(pred: list[str], gold: str, competitor: str, own: set[str]) -> bool:
    """Whether the prediction names `competitor`: all of its words that are not the gold's own (`own`); one whose
    words are all the gold's ("CT" against "CT with contrast") when it appears outside the gold's phrase."""
    keys = set(competitor.split()) - own
    if keys:
        return keys <= set(pred)
    return _has_phrase(" ".join(_without_phrase(pred, gold.split())), competitor)


def closed_correct(prediction: str, answer: str, options: Sequence[str] = (), question: str = "") -> bool:
    """Closed-ended accuracy for one example: yes/no answers by `yes_no_of`; any other answer by normalised
    equality, or when the prediction names the answer and nothing that competes with it.

    Names the answer: holds the normalised answer as whole words, or, when the `question` offers alternatives
    (`question_alternatives`), the answer's distinguishing words: its words that no competing alternative or option
    has, scaffolding dropped ("Right side" to "...on the left or right side?" is named by "On the right"; "one" by
    "just 1"). Competitors: the other `options`, the question's alternatives other than the one the answer is
    (the alternative sharing most words with it, fewest extra), and the other members of an `ANSWER_KINDS`
    vocabulary the answer names (left / right, CT / MRI / ...). Wrong when the prediction names a competitor too
    ("Left lung and right lung", "CT, MRI", "right and left": ambiguous), says "or", or holds a negation outside
    the answer's words ("The lesion is on the left side." is "left"; "not on the left" is not).
    """
    gold = normalize_answer(answer)
    if gold in YES_NO:
        return yes_no_of(prediction) == gold
    text = normalize_answer(prediction)
    if text == gold:
        return True
    pred, gold_words = text.split(), set(gold.split())
    alternatives = question_alternatives(question)
    own_index = _own_alternative(gold_words, alternatives)
    own = gold_words | (set(alternatives[own_index].split()) if own_index is not None else set())
    competitors = [a for i, a in enumerate(alternatives) if i != own_index]
    competitors += [o for o in dict.fromkeys(normalize_answer(o) for o in options) if o and o != gold]
    if _has_phrase(text, gold):
        rest = _without_phrase(pred, gold.split())
    else:
        rivals = set().union(*(c.split() for c in competitors)) if competitors else set()
        keys = gold_words - rivals
        keys = (keys - _SCAFFOLDING) or keys
        if not alternatives or not keys or not keys <= set(pred):
            return False
        rest = [w for w in pred if w not in keys]
    if "or" in rest or any(w in _NEGATIONS for w in rest):
        return False
    if any(_named_competitor(pred, gold, c, own) for c in competitors):
        return False
    for kind in ANSWER_KINDS:
        if any(_has_phrase(gold, m) for m in kind) and any(
                _has_phrase(text, m) and not _has_phrase(gold, m) for m in kind):
            return False
    return True


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


_EMPHASIS = re.compile(r"[*_`]+")


def _strict_letter(text: str, n_options: int) -> int | None:
    text = _EMPHASIS.sub("", text).strip()  # "**B**", "`A`": markdown around the letter
    for pattern in _STRICT_LETTER:
        match = pattern.search(text)
        if match:
            index = LETTERS.index(next(g for g in match.groups() if g).upper())
            return index if index < n_options else None
    return None


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
        index = _resolve_option(normalize_answer(prediction), [normalize_answer(o) for o in options])
    return None if index is None else LETTERS[index]


def choice_correct(prediction: str, answer_letter: str, options: Sequence[str]) -> bool:
    return parse_choice_letter(prediction, options) == answer_letter.strip().upper()


def lettered_option(index: int, option: str) -> str:
    """The line that poses option `index` under its letter in a prompt: "B. right"."""
    return f"{LETTERS[index]}. {option}"


def poses_lettered_options(prompt: str, options: Sequence[str]) -> bool:
    """Whether `prompt` lists every one of `options` on its own line under its letter (`lettered_option`, as
    `benchmarks.lettered_prompt` writes them): only then can a bare letter ("B") answer the question."""
    lines = {line.strip() for line in str(prompt).splitlines()}
    return bool(options) and all(lettered_option(i, o) in lines for i, o in enumerate(options))


def in_domain_correct(prediction: str, answer: str, options: Sequence[str] = (), target: str | None = None,
                      lettered: bool = False) -> bool:
    """In-domain closed-ended match (App. B.4): `normalize_answer` equality with the ground truth.

    When the ground truth does not name the question's `target` (a bare choice such as "right", which the loader
    read from "The left kidney is in the right part of the image."), the target's name is removed from answer,
    options and prediction alike. With options, a prediction that is not verbatim an option is first resolved to
    one: an option letter ("B", "(B)", "Answer: B") when the question listed its options under letters
    (`lettered`; a yes/no or location question asked as it is has none, so "B" there is no answer), the yes/no it
    states ("Yes, the liver is visible." -> "yes"), or the only option it mentions; it is correct when that option
    is the ground truth.
    """
    strip = (target,) if target and not _has_phrase(normalize_answer(answer), normalize_answer(target)) else ()
    gold = normalize_answer(answer, strip)
    if normalize_answer(prediction, strip) == gold:
        return True
    if not options:
        return False
    norm = [normalize_answer(o, strip) for o in options]
    index = _strict_letter(str(prediction), len(options)) if lettered else None
    if index is None and set(norm) == set(YES_NO):
        said = yes_no_of(prediction)
        index = norm.index(said) if said else None
    if index is None:
        index = _resolve_option(normalize_answer(prediction, strip), norm)
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
        return ExampleScore(correct=closed_correct(prediction, example.answer, example.options, example.question),
                            parsed=parsed)
    if match == "letter":
        letter = parse_choice_letter(prediction, example.options)
        return ExampleScore(correct=letter == example.answer.strip().upper(), parsed=letter)
    if match == "exact":
        return ExampleScore(correct=in_domain_correct(prediction, example.answer, example.options,
                                                      example.extra.get("target"),
                                                      poses_lettered_options(example.prompt, example.options)))
    raise ValueError(f"example {example.id!r}: unknown match kind {match!r} (expected one of {MATCH_KINDS})")


def _summary(scores: Sequence[ExampleScore], with_f1: bool = True) -> dict:
    n = len(scores)
    out = {"count": n, "accuracy": sum(s.correct for s in scores) / n if n else 0.0}
    f1s = [s.f1 for s in scores if s.f1 is not None]
    if f1s and with_f1:
        out["token_f1"] = sum(f1s) / len(f1s)
        out["token_recall"] = sum(s.recall for s in scores if s.recall is not None) / len(f1s)
    return out


def _closed_and_open(rows: Sequence[tuple]) -> dict:
    """A group's scores with closed and open questions kept apart, never pooled: {count, closed_count,
    closed_accuracy (when it has closed questions), open_count, open_token_f1 (when it has open ones)}."""
    closed = [s.correct for e, s in rows if e.answer_type == "closed"]
    f1s = [s.f1 for e, s in rows if e.answer_type == "open" and s.f1 is not None]
    out = {"count": len(rows), "closed_count": len(closed), "open_count": len(rows) - len(closed)}
    if closed:
        out["closed_accuracy"] = sum(closed) / len(closed)
    if f1s:
        out["open_token_f1"] = sum(f1s) / len(f1s)
    return out


def gold_key(example) -> str:
    """What a ground truth is counted as when answers are tallied: its normalised text, or the option letter for
    multiple choice (normalised, "A" would be the article and vanish)."""
    return example.answer.strip().upper() if example.match == "letter" else normalize_answer(example.answer)


def most_frequent(answers: Iterable[str]) -> tuple[str | None, int]:
    """The most frequent of `answers` and its count; (None, 0) when there are none.

    A tie goes to the alphabetically first answer, whatever the order of the examples. This is the one tie rule of
    every majority answer: `majority_answer` (evaluate's closed_majority_answer and majority baselines) and the
    floors of `eval.floors` (each question type's majority answer, the open types' most frequent answer), so that
    reports name the same majority answer for the same split.
    """
    counts = collections.Counter(answers)
    if not counts:
        return None, 0
    answer = min(counts, key=lambda a: (-counts[a], a))
    return answer, counts[answer]


def majority_answer(examples: Sequence) -> str | None:
    """The most frequent `gold_key` among the closed examples (ties: the alphabetically first, `most_frequent`), or
    None when there are no closed examples."""
    return most_frequent(gold_key(e) for e in examples if e.answer_type == "closed")[0]


def source_group(source: str) -> str:
    """The Table 1 row an in-domain source belongs to: "MSD Task03_Liver" -> "MSD", "biomedparse" ->
    "BiomedParse"; any other source (e.g. "phantom") is its own group."""
    low = str(source).strip().lower()
    if low == "msd" or low.startswith("msd "):
        return "MSD"
    if low.startswith("biomedparse"):
        return "BiomedParse"
    return str(source).strip()


def score(examples: Sequence, predictions: Sequence[str]) -> dict:
    """Scores of a benchmark run: overall and per answer type, with counts, and the comparability numbers.

    Returns {"count", "overall": {count, accuracy}, "closed": {count, accuracy}, "open": {count, accuracy,
    token_f1, token_recall}, "closed_yes_no": {...} (closed examples whose answer is yes/no, when there are any),
    "per_source": {group: {...}} (when examples carry extra["source"], grouped by `source_group` as Table 1's
    in-domain rows) and "per_question_type": {type: {...}} (when examples carry extra["question_type"]), each
    group's {count, closed_count, closed_accuracy, open_count, open_token_f1} with closed accuracy and open token F1
    kept apart (`_closed_and_open`), the flat numbers below, "per_example": [ExampleScore, ...]}.
    Types with no examples are left out; "overall.accuracy" counts open examples by exact match.

    Flat numbers (fractions; present when the subset exists):
      closed_accuracy                    correct closed / closed questions: Acc_closed as usually defined.
      accuracy_over_all                  correct answers / all questions, closed ones by the closed scorer, open
                                         ones by exact match after normalisation (= overall.accuracy): on the scale
                                         of Table 1's VQA-RAD Acc_closed values (13 of 17 are k/451, none k/272),
                                         though B.4 defines that column on the closed subset and the authors'
                                         scoring of open answers is not given.
      closed_majority_baseline           the closed questions answered with `majority_answer`, same scorer.
      closed_majority_by_type_baseline   each closed question answered with the majority answer of its question
                                         type, same scorer, when every closed example's extra["question_type"]
                                         is one of vital_jax's own types (`records.QUESTION_TYPES`: phantom_vqa,
                                         in_domain): the stronger floor, which knows each type's answer set
                                         (PhantomVQA's, `eval.floors`). Not for VQA-RAD's annotated types.
    Every majority answer is counted on the evaluated examples themselves (the split scored, not a training split):
    a floor that knows the evaluated split's answer distribution.
      closed_chance                      mean 1 / number of options over the closed questions (when they all list
                                         their options): what guessing scores.
      open_token_f1                      mean token F1 over the open questions (Token-F1_open).
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
    groups, by_type = collections.defaultdict(list), collections.defaultdict(list)
    for e, s in zip(examples, per_example):
        if e.extra.get("source"):
            groups[source_group(e.extra["source"])].append((e, s))
        if e.extra.get("question_type"):
            by_type[str(e.extra["question_type"])].append((e, s))
    if groups:
        out["per_source"] = {g: _closed_and_open(groups[g]) for g in sorted(groups)}
    if by_type:
        out["per_question_type"] = {t: _closed_and_open(rows) for t, rows in sorted(by_type.items())}
    closed = [e for e in examples if e.answer_type == "closed"]
    if closed:
        n_correct = sum(s.correct for e, s in zip(examples, per_example) if e.answer_type == "closed")
        majority = majority_answer(closed)
        n_majority = sum(score_example(e, majority).correct for e in closed)
        out.update(closed_accuracy=n_correct / len(closed), closed_majority_baseline=n_majority / len(closed),
                   closed_majority_answer=majority)
        # Only where the types are vital_jax's own (one question template and answer set each): VQA-RAD's annotated
        # types include composites ("ATTRIB, PRES") of 1-3 closed questions, each its own trivially "right" majority.
        if all(str(e.extra.get("question_type")) in QUESTION_TYPES for e in closed):
            typed = collections.defaultdict(list)
            for e in closed:
                typed[str(e.extra["question_type"])].append(e)
            n_typed = sum(score_example(e, majority_answer(group)).correct for group in typed.values() for e in group)
            out["closed_majority_by_type_baseline"] = n_typed / len(closed)
        if all(e.options for e in closed):
            out["closed_chance"] = sum(1.0 / len(e.options) for e in closed) / len(closed)
    if "open" in out:
        out["open_token_f1"] = out["open"]["token_f1"]
    if closed and "open" in out:
        out["accuracy_over_all"] = out["overall"]["accuracy"]
    out["per_example"] = per_example
    return out


def headline(metrics: dict) -> dict:
    """The numbers a paper table reports (fractions), when present: Acc_closed over the closed questions, the
    accuracy over all questions (the scale of Table 1's VQA-RAD values, `score`), the closed majority baseline
    and Token-F1_open."""
    out = {}
    if "closed" in metrics:
        out["acc_closed"] = metrics["closed"]["accuracy"]
    for key in ("accuracy_over_all", "closed_majority_baseline"):
        if key in metrics:
            out[key] = metrics[key]
    if "token_f1" in metrics.get("open", {}):
        out["token_f1_open"] = metrics["open"]["token_f1"]
    return out
