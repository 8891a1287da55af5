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
import zlib
from typing import Sequence

import numpy as np

from vital_jax.data import questions
from vital_jax.data.questions import CLOSED_TYPES
from vital_jax.data.records import Record

DROPPED_FILE = "balance_dropped.jsonl"


def closed_answer(record: Record) -> str:
    """The short answer of a closed-ended record ("yes" / "no", or the location choice its answer names:
    `questions.closed_answer`); ValueError names the record."""
    try:
        return questions.closed_answer(record.question_type, record.question, record.answer, record.target)[0]
    except ValueError as e:
        raise ValueError(f"record {record.id!r}: {e}") from None


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
