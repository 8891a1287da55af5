"""The floors of `eval.floors` and the scores of `eval.metrics` name the same majority answer."""

import pytest

from tests.eval.test_benchmarks import _image, _record, _write_jsonl
from vital_jax.eval import metrics
from vital_jax.eval.benchmarks import load_benchmark
from vital_jax.eval.floors import floors


def _dataset(tmp_path, answers):
    records = [dict(_record(i, "yes_no", "Is the liver visible?", answer), reasoning_chain=["Look."],
                    source="phantom") for i, answer in enumerate(answers)]
    for i in range(3):
        _image(str(tmp_path / "images" / f"{i}.png"))
    _write_jsonl(str(tmp_path / "records.jsonl"), records)
    return str(tmp_path)


@pytest.mark.parametrize("answers", [("Yes.", "Yes.", "No.", "No."), ("No.", "Yes.", "No.", "Yes.")])
def test_a_tied_majority_answer_is_the_alphabetically_first_in_floors_and_scores(tmp_path, answers):
    """Two yes and two no: `floors` named the first seen ("yes" when a yes came first), `metrics.score` the
    alphabetically first ("no"); the share was the same. Both follow `metrics.most_frequent` now."""
    data_dir = _dataset(tmp_path, answers)
    floor = floors(data_dir, "test")
    scores = metrics.score(load_benchmark("phantom_vqa", data_dir, split="test"), [""] * len(answers))
    assert floor["yes_no"]["majority_answer"] == scores["closed_majority_answer"] == "no"
    assert floor["yes_no"]["majority"] == floor["closed"]["majority"] == scores["closed_majority_baseline"] == 0.5


def test_most_frequent_counts_and_breaks_ties_alphabetically():
    assert metrics.most_frequent(["b", "a", "b", "a", "c"]) == ("a", 2)
    assert metrics.most_frequent(["b", "a", "b"]) == ("b", 2)
    assert metrics.most_frequent([]) == (None, 0)
