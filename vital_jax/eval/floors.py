"""Floors for PhantomVQA-style evaluations: what a model scores without learning anything from the image.

Per question type on a split: chance (1 / number of options) and the majority answer for the closed types, the
most frequent answer's token F1 for the open ones; over all closed questions the pooled majority (`evaluate`'s
closed_majority_baseline), the per-type majority (each type answered with its own most frequent answer) and the
per-option-set majority (each question answered with the most frequent answer among the questions offering its
options: a location choice between left / center / right is not answered "upper"), and `strongest`, the largest
closed floor, chance included.
Ties between answers go to the alphabetically first, as in `evaluate`'s scores (`metrics.most_frequent`). Every
majority answer is counted on the split evaluated (the floor knows its answer distribution), not on a training split.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from vital_jax.data.records import RECORDS_FILE, read_records
from vital_jax.eval import metrics as score_lib
from vital_jax.eval.benchmarks import load_benchmark


def question_types(data_dir: str) -> dict[str, str]:
    """Record id -> question type of a vital_jax dataset directory."""
    return {r.id: r.question_type for r in read_records(os.path.join(data_dir, RECORDS_FILE))}


def floors(data_dir: str, split: str, limit: int | None = None) -> dict:
    """Per question type on `split` (its first `limit` questions, the ones `evaluate --limit` answers): chance
    (mean 1 / number of options) and the majority-answer share for the closed types; over all closed questions:
    chance, the majority answer of them all (`evaluate`'s closed_majority_baseline) and `majority_by_type` (each
    type answered with its own majority answer, the stronger floor: it knows the answer set of each question
    type; None when the split has no closed question). The open types' floor is the F1 of always answering the
    most frequent answer text of the type (what a model that ignores image and question scores)."""
    examples = load_benchmark("phantom_vqa", data_dir, split=split, limit=limit)
    by_type = collections.defaultdict(list)
    types = question_types(data_dir)
    for e in examples:
        by_type[types[e.id]].append(e)
    out = {}
    for qtype, group in by_type.items():
        if group[0].answer_type == "closed":
            answer, hits = score_lib.most_frequent(score_lib.gold_key(e) for e in group)
            out[qtype] = {"chance": float(np.mean([1.0 / len(e.options) for e in group])),
                          "majority": hits / len(group), "majority_answer": answer,
                          "majority_by_options": _majority_by_options(group) / len(group), "count": len(group)}
        else:
            common, _ = score_lib.most_frequent(e.answer for e in group)
            f1 = [score_lib.token_f1(common, e.answer) for e in group]
            out[qtype] = {"majority_f1": float(np.mean(f1)), "count": len(group)}
    open_ = [t for t in out if "majority_f1" in out[t]]
    if open_:  # count-weighted over the open types: the open F1 column's floor
        count = sum(out[t]["count"] for t in open_)
        out["open"] = {"majority_f1": sum(out[t]["majority_f1"] * out[t]["count"] for t in open_) / count,
                       "count": count}
    closed = [e for e in examples if e.answer_type == "closed"]
    if not closed:   # a dataset of open questions only (e.g. BiomedParse's): no closed floor to state
        out["closed"] = {"chance": None, "majority": None, "majority_by_type": None, "majority_by_options": None,
                         "strongest": None, "count": 0}
        return out
    _, hits = score_lib.most_frequent(score_lib.gold_key(e) for e in closed)
    by_type_hits = sum(out[t]["majority"] * out[t]["count"] for t in out if "majority" in out[t])
    by_options_hits = sum(out[t]["majority_by_options"] * out[t]["count"] for t in out if "majority" in out[t])
    closed_floor = {"chance": float(np.mean([1.0 / len(e.options) for e in closed])), "majority": hits / len(closed),
                    "majority_by_type": by_type_hits / len(closed),
                    "majority_by_options": by_options_hits / len(closed)}
    out["closed"] = {**closed_floor, "strongest": max(closed_floor.values()), "count": len(closed)}
    return out


def _majority_by_options(group) -> int:
    """Questions of `group` answered right by the most frequent answer among the questions offering the same
    options (its option set's majority)."""
    by_options = collections.defaultdict(list)
    for e in group:
        by_options[tuple(sorted(e.options))].append(e)
    return sum(score_lib.most_frequent(score_lib.gold_key(e) for e in same)[1] for same in by_options.values())
