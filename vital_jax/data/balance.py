"""Answer balancing for closed-ended questions: the same question text gets each of its answers equally often.

Generated VQA data leaks answers through the question: "Is the liver visible in this CT scan?" is always yes,
"Is the kidney in the upper, middle, or lower part of the image?" mostly "lower". A model can then score well
without looking at the image, and an accuracy above the majority baseline proves nothing. Balancing (as CLEVR
and VQA v2 did) keeps, for every question text, the same number of records per answer (the count of its rarest
answer), chosen by a seeded draw, within each split; a text with only one answer seen is dropped entirely. The
best text-only predictor is then at chance for every question text. Open-ended records are kept as they are.
Dropped records are not lost: `build` writes them to `balance_dropped.jsonl`.
"""

from __future__ import annotations

import collections
import re
import zlib
from typing import Sequence

import numpy as np

from vital_jax.data.questions import LOCATION_CHOICES
from vital_jax.data.records import Record

CLOSED_TYPES = ("yes_no", "location_choice")
DROPPED_FILE = "balance_dropped.jsonl"


def closed_answer(record: Record) -> str:
    """The short answer of a closed-ended record: "yes"/"no", or the location choice its answer names (the
    target's own name, e.g. "left kidney", does not choose)."""
    if record.question_type == "yes_no":
        word = re.match(r"\s*([a-z]+)", record.answer.lower())
        if not word or word.group(1) not in ("yes", "no"):
            raise ValueError(f"record {record.id!r}: yes/no answer does not start with yes or no: {record.answer!r}")
        return word.group(1)
    if record.question_type == "location_choice":
        asked = set(re.findall(r"[a-z]+", record.question.lower()))
        rest = re.sub(re.escape(record.target), " ", record.answer, flags=re.IGNORECASE) if record.target else \
            record.answer
        words = set(re.findall(r"[a-z]+", rest.lower()))
        words |= {"center"} if words & {"central", "centre"} else set()
        for choices in LOCATION_CHOICES.values():
            named = [c for c in choices if c in words]
            if set(choices) <= asked and len(named) == 1:
                return named[0]
        raise ValueError(f"record {record.id!r}: cannot read the location choice of {record.answer!r}")
    raise ValueError(f"record {record.id!r}: {record.question_type!r} is not a closed-ended question type")


def balance_closed_answers(records: Sequence[Record], seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(kept, dropped), both in input order: per (split, question text) of a closed type, an equal number of
    records per answer (see the module docstring)."""
    groups: dict[tuple[str, str], dict[str, list[int]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for i, r in enumerate(records):
        if r.question_type in CLOSED_TYPES:
            groups[(r.split, r.question)][closed_answer(r)].append(i)
    keep = np.ones(len(records), bool)
    for (split, text), by_answer in groups.items():
        quota = min(len(rows) for rows in by_answer.values()) if len(by_answer) > 1 else 0
        rng = np.random.default_rng([seed, zlib.crc32(f"{split}/{text}".encode("utf-8"))])
        for answer in sorted(by_answer):
            rows = by_answer[answer]
            drop = rng.permutation(len(rows))[quota:]
            keep[[rows[j] for j in drop]] = False
    return ([r for r, k in zip(records, keep) if k], [r for r, k in zip(records, keep) if not k])
