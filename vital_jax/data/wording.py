"""English for generated questions and teacher text: articles, number agreement, count words, and the checks the
quality gate's grammar round runs on every teacher output (vital_jax.data.quality_gate).

Target names come from dataset labels ("enhancing tumor", "neoplastic cells", "pancreas"), so "a"/"an" and
"is"/"are" cannot be written into templates: `article` and `is_plural` decide them. The checks in
`grammar_problems` are deliberately narrow (a wrong article before a lower-case word, a count with a singular
noun, "there is two", a verb that disagrees with the target's own name): each is a plain error in any teacher's
output, and none fires on correct English that the teachers write.
"""

from __future__ import annotations

import re

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Words starting with a vowel letter but a consonant sound ("a uterus", "a one-sided", "a European").
_YOU_SOUND = ("uni", "use", "usu", "uter", "ure", "uri", "uro", "ura", "uti", "ubi", "uvu", "uve", "eu", "ewe",
              "one", "once")
# Words starting with a silent h ("an hour").
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
# Acronyms read as words, not letter by letter ("a FLAIR image", "a COVID-19 infection").
_WORD_ACRONYMS = ("FLAIR", "COVID", "SPECT", "SARS", "MERS", "NASA", "LASER")
# Letters whose names start with a vowel sound: "an MRI", "an X-ray", "an H&E stain".
_VOWEL_LETTERS = "AEFHILMNORSX"
# Plural nouns not ending in -s, and singular ones that do.
_IRREGULAR_PLURALS = {"nuclei", "glomeruli", "bronchi", "alveoli", "villi", "cilia", "bacteria", "vertebrae",
                      "fungi", "data", "teeth", "feet", "people", "criteria", "phenomena"}
_SINGULAR_S = {"pancreas", "atlas", "gas", "lens", "ascites", "diabetes", "herpes", "series", "species", "biceps",
               "triceps", "news", "chaos"}
_SINGULAR_S_ENDINGS = ("ss", "us", "is")


def _is_acronym(word: str) -> bool:
    """"MRI", "CT", "X-ray", "H&E", "T1-weighted": read letter by letter."""
    if not word[:1].isupper() or word.upper().startswith(_WORD_ACRONYMS):
        return False
    return len(word) == 1 or not word[1].islower()


def article(phrase: str) -> str:
    """"a" or "an" for the sound the phrase starts with."""
    word = phrase.strip().lstrip("(\"'").split(" ")[0]
    if not word:
        return "a"
    if word[0].isdigit():
        return "an" if re.match(r"8|1[18](?!\d)", word) else "a"
    if _is_acronym(word):
        return "an" if word[0].upper() in _VOWEL_LETTERS else "a"
    lower = word.lower()
    if lower.startswith(_SILENT_H):
        return "an"
    if lower[0] in "aeiou":
        return "a" if lower.startswith(_YOU_SOUND) else "an"
    return "a"


def with_article(phrase: str) -> str:
    """"an enhancing tumor", "a uterus", "an MRI scan"."""
    return f"{article(phrase)} {phrase}"


def is_plural(name: str) -> bool:
    """Whether a target name is a plural noun phrase ("neoplastic cells", "lungs"; not "pancreas", "glomerulus")."""
    words = re.findall(r"[a-z0-9-]+", name.lower())
    if not words:
        return False
    last = words[-1]
    if last in _IRREGULAR_PLURALS:
        return True
    if last in _SINGULAR_S or not last.endswith("s") or last.endswith(_SINGULAR_S_ENDINGS):
        return False
    return len(last) > 3


def count_word(n: int) -> str:
    """"two", "ten", "12"."""
    return COUNT_WORDS[n] if 0 <= n < len(COUNT_WORDS) else str(n)


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def decapitalize(word: str) -> str:
    """`word` lower-cased only when it is an ordinary capitalised word ("Liver" -> "liver", "The" -> "the"): one
    with another capital or a digit after its first letter is an acronym or a name ("MRI", "COVID-19", "T2",
    "McBurney") and keeps its case."""
    if re.fullmatch(r"[A-Z][^A-Z0-9]*", word):
        return word.lower()
    return word


class Subject:
    """A target name as a sentence subject: its verb forms and pronouns agree with its number."""

    _PLURAL_VERBS = {"is": "are", "was": "were", "has": "have", "does": "do", "lies": "lie"}

    def __init__(self, name: str):
        self.name = name
        self.plural = is_plural(name)

    def verb(self, third_person: str) -> str:
        """The verb agreeing with the subject, given its third-person singular form ("lies" -> "lie")."""
        if not self.plural:
            return third_person
        if third_person in self._PLURAL_VERBS:
            return self._PLURAL_VERBS[third_person]
        if third_person.endswith("ies"):
            return third_person[:-3] + "y"
        if third_person.endswith(("shes", "ches", "sses", "xes")):
            return third_person[:-2]
        return third_person[:-1]

    @property
    def it(self) -> str:
        return "they" if self.plural else "it"

    @property
    def its(self) -> str:
        return "their" if self.plural else "its"

    @property
    def the(self) -> str:
        return f"the {self.name}"

    @property
    def indefinite(self) -> str:
        """"a liver tumor", "an enhancing tumor", "neoplastic cells" (no article for a plural)."""
        return self.name if self.plural else with_article(self.name)


# ------------------------------------------------------------------------------------------ the gate's checks
_ARTICLE_RE = re.compile(r"(?:^|(?<=[\s(\"'\[]))(a|an|A|An)\s+([A-Za-z][\w&-]*)")
_SENTENCE_START_RE = re.compile(r"(?:^|[.!?:;\"'(\[])\s*$")
_PLURAL_NOUNS = ("region", "part", "structure", "component", "area", "focus", "lobe", "portion", "island", "cell",
                 "nodule", "lesion", "gland", "piece", "cluster", "spot", "patch")
_PLURAL_NOUN_FORMS = ("regions", "parts", "structures", "components", "areas", "foci", "lobes", "portions",
                      "islands", "cells", "nodules", "lesions", "glands", "pieces", "clusters", "spots", "patches")
_COUNTS = r"(?:two|three|four|five|six|seven|eight|nine|ten|several|multiple|numerous)"
# A compound noun ("two region types") is not an error.
_COMPOUND_HEADS = r"types?|sizes?|levels?|boundar(?:y|ies)|borders?|edges?|margins?|walls?|widths?|heights?|counts?"
_COUNT_SINGULAR_RE = re.compile(rf"\b{_COUNTS}\s+(?:[a-z-]+\s+)?(?:{'|'.join(_PLURAL_NOUNS)})\b(?!-)"
                                rf"(?!\s+(?:{_COMPOUND_HEADS})\b)", re.IGNORECASE)
_COUNT_IS_RE = re.compile(rf"\b{_COUNTS}\s+(?:[a-z-]+\s+){{0,2}}(?:{'|'.join(_PLURAL_NOUN_FORMS)})\s+(?:is|was|has)\b",
                          re.IGNORECASE)
_PREPOSITIONS = {"of", "between", "among", "in", "across", "from", "with", "by", "to", "for", "at", "on", "within",
                 "into", "over", "under", "beside", "behind", "than", "like"}
_THERE_RE = re.compile(rf"\bthere\s+(?:is|was)\s+{_COUNTS}\b|\bthere\s+(?:are|were)\s+(?:one|a\s+single)\b",
                       re.IGNORECASE)
_PRONOUN_RE = re.compile(r"\bit\s+are\b|\bthey\s+(?:is|was|has)\b", re.IGNORECASE)


def _article_problems(text: str) -> list[str]:
    out = []
    for match in _ARTICLE_RE.finditer(text):
        written, word = match.group(1), match.group(2)
        if written[0] == "A" and not _SENTENCE_START_RE.search(text[:match.start()]):
            continue  # "type A cells", "grade A": a letter, not an article
        if _is_acronym(word) or word.lower().startswith("h") and written.lower() == "an":
            continue  # acronym sounds and "an historic" are left to the writer
        if len(word) > 1 and word[1] == "-":  # "an x-ray", "a t-test": the letter's name decides
            expected = "an" if word[0].upper() in _VOWEL_LETTERS else "a"
        else:
            expected = article(word.lower())
        if written.lower() != expected:
            out.append(f"'{written} {word}' (write '{expected} {word}')")
    return out


def _preceded_by_preposition(text: str, start: int) -> bool:
    before = re.findall(r"[a-z]+", text[:start].lower())[-2:]
    return any(w in _PREPOSITIONS for w in before)


def grammar_problems(text: str, target: str = "") -> list[str]:
    """Plain grammar errors in `text`, each quoted with its fix; `target` (the sample's target name) lets the check
    see a verb that disagrees with it ("the lungs is", "the kidney are")."""
    out = _article_problems(text)
    for match in _COUNT_SINGULAR_RE.finditer(text):
        out.append(f"'{match.group(0)}' (a count needs a plural noun)")
    for match in _COUNT_IS_RE.finditer(text):
        if not _preceded_by_preposition(text, match.start()):
            out.append(f"'{match.group(0)}' (a plural subject takes a plural verb)")
    for regex, why in ((_THERE_RE, "'there is' with a plural, 'there are' with a singular"),
                       (_PRONOUN_RE, "the pronoun and its verb disagree")):
        out += [f"'{m.group(0)}' ({why})" for m in regex.finditer(text)]
    if target.strip():
        name = r"\s+".join(re.escape(w) for w in target.split())
        verbs = r"(?:is|was|has)" if is_plural(target) else r"(?:are|were)"
        # Not after "and" (a compound subject) or "of" ("the centre of the lungs is": the subject is the centre).
        regex = re.compile(rf"(?<!\band\s)(?<!\bof\s)\bthe\s+{name}\s+{verbs}\b", re.IGNORECASE)
        number = "plural" if is_plural(target) else "singular"
        out += [f"'{m.group(0)}' (the {target} is {number})" for m in regex.finditer(text)]
    return out
