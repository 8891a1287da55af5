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


def _typed_dataset(tmp_path):
    """Four yes/no test questions (yes, yes, no, no) and an open one: the first two have a majority floor of 100 %,
    all four of 50 %."""
    records = [dict(_record(i, "yes_no", "Is the liver visible?", answer), reasoning_chain=["Look."], source="phantom")
               for i, answer in enumerate(("Yes.", "Yes.", "No.", "No."))]
    records.append(dict(_record(4, "identify", "What organ is shown?", "The liver."), reasoning_chain=["Look."],
                        source="phantom"))
    for i in range(3):
        _image(str(tmp_path / "images" / f"{i}.png"))
    _write_jsonl(str(tmp_path / "records.jsonl"), records)
    return str(tmp_path)


def test_floors_with_a_limit_are_those_of_the_first_questions(tmp_path):
    data_dir = _typed_dataset(tmp_path)
    assert floors(data_dir, "test")["closed"] == {"chance": 0.5, "majority": 0.5, "majority_by_type": 0.5,
                                                  "majority_by_options": 0.5, "strongest": 0.5, "count": 4}
    assert floors(data_dir, "test", limit=2)["closed"] == {"chance": 0.5, "majority": 1.0, "majority_by_type": 1.0,
                                                            "majority_by_options": 1.0, "strongest": 1.0, "count": 2}


def test_location_choices_of_two_option_sets_have_a_floor_per_set_and_the_strongest_floor_is_named(tmp_path):
    """The per-type majority answered every location choice with one word ("right") whichever options the
    question offered (left/center/right or upper/middle/lower): 40 % here, below the 1/3 chance per question, yet
    the README called it the stronger floor."""
    horizontal = "Is the liver in the left, right, or center of the image?"
    vertical = "Is the liver in the upper, middle, or lower part of the image?"
    answers = [(horizontal, "The liver is in the right part of the image.")] * 4 + [
        (horizontal, "The liver is in the center of the image.")] + [
        (vertical, "The liver is in the upper part of the image.")] * 3 + [
        (vertical, "The liver is in the lower part of the image.")] * 2
    records = [dict(_record(i, "location_choice", q, a), reasoning_chain=["Look."], source="phantom")
               for i, (q, a) in enumerate(answers)]
    records.append(dict(_record(10, "identify", "What organ is shown?", "The liver."), reasoning_chain=["Look."],
                        source="phantom"))
    for i in range(3):
        _image(str(tmp_path / "images" / f"{i}.png"))
    _write_jsonl(str(tmp_path / "records.jsonl"), records)
    floor = floors(str(tmp_path), "test")
    assert floor["location_choice"]["majority"] == pytest.approx(4 / 10)              # "right" for all ten
    assert floor["location_choice"]["majority_by_options"] == pytest.approx((4 + 3) / 10)  # right / upper
    closed = floor["closed"]
    assert closed["chance"] == pytest.approx(1 / 3) and closed["strongest"] == closed["majority_by_options"]
    assert floor["open"] == {"majority_f1": pytest.approx(1.0), "count": 1}


def test_the_demo_states_the_floors_of_the_questions_it_evaluated(tmp_path, monkeypatch, capsys):
    """With an eval limit the demo's summary gave the whole split's closed count and per-type floor beside accuracy
    on the first N questions. Evaluation, explanation and export are stubbed: only the floors are under test."""
    import json
    import types

    from conversion import vital_export
    from vital_jax import demo, evaluate, explain
    from vital_jax.eval.benchmarks import load_benchmark

    data_dir = _typed_dataset(tmp_path / "data")
    run = types.SimpleNamespace(paths=types.SimpleNamespace(data_dir=data_dir), step=1,
                                model=types.SimpleNamespace(config=types.SimpleNamespace(k_max=1)),
                                config=types.SimpleNamespace(curriculum=types.SimpleNamespace(max_k=(1,))))

    def fake_evaluate(workdir, benchmark, data_dir, out, ks, split, limit, **kwargs):
        examples = load_benchmark(benchmark, data_dir, split=split, limit=limit)
        return [metrics.score(examples, ["yes"] * len(examples)) for _ in ks]

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(explain, "explain_example", lambda *args: {"answer": "Yes.", "step_texts": []})
    monkeypatch.setattr(vital_export, "export_run", lambda *args, **kwargs: None)
    demo.finish(str(tmp_path / "work"), eval_limit=2, run=run)
    summary = json.load(open(tmp_path / "work" / "eval" / "demo_summary.json"))
    assert summary["closed_count"] == 2
    assert {r["closed_majority_by_type_baseline"] for r in summary["results"]} == {1.0}
    assert {r["closed_majority_by_options_baseline"] for r in summary["results"]} == {1.0}
    assert {r["closed_majority_baseline"] for r in summary["results"]} == {1.0}
    assert "| 100.0% | 100.0% | 100.0% | 100.0% | 50.0% |" in capsys.readouterr().out
