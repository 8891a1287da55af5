"""App. B.4 metrics: normalisation, closed accuracy (yes/no counted in full), token F1, choice letters, scoring."""

import collections

import pytest

from vital_jax.eval import metrics
from vital_jax.eval.benchmarks import BenchmarkExample


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("  The   Liver. ", "liver"),
    ("An enlarged heart!", "enlarged heart"),
    ("a", ""),
    ("Two", "2"),
    ("two lesions", "2 lesions"),
    ("2", "2"),
    ("twelve", "12"),
    ("2.5 cm", "2.5 cm"),
    ("end.", "end"),
    ("x-ray", "x ray"),
    ("Posterior-Anterior", "posterior anterior"),
    ("patient's (left) side", "patients left side"),
    ("theory", "theory"),              # articles are whole tokens only
    ("\tSkull \tcartilage", "skull cartilage"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, answer, correct", [
    ("yes", "Yes", True),
    ("Yes, there is an aneurysm.", "yes", True),
    ("no", "yes", False),                          # a wrong yes/no answer counts as wrong
    ("No.", "no", True),
    ("There is no effusion", "no", True),          # says exactly one of yes/no
    ("The aorta is dilated", "yes", False),        # neither yes nor no: wrong, not dropped
    ("", "no", False),
    ("maybe yes maybe no", "yes", False),          # both, not leading with one
    ("two", "2", True),
    ("2", "Two", True),
    ("The left", "left", True),
    ("left side", "left", False),                  # exact after normalisation, no containment
    ("MRI", "mri", True),
    ("CT", "MRI", False),
])
def test_closed_correct(prediction, answer, correct):
    assert metrics.closed_correct(prediction, answer) is correct


@pytest.mark.parametrize("prediction, answer, precision, recall, f1", [
    ("right temporal lobe", "right temporal lobe", 1.0, 1.0, 1.0),
    ("temporal lobe", "right temporal lobe", 1.0, 2 / 3, 0.8),
    ("the right lung", "Right lung", 1.0, 1.0, 1.0),
    ("", "free air", 0.0, 0.0, 0.0),               # empty prediction scores 0
    ("   ", "free air", 0.0, 0.0, 0.0),
    ("kidney", "free air", 0.0, 0.0, 0.0),
    ("air air air", "free air", 1 / 3, 1 / 2, 0.4),  # repeated tokens count once each against one gold "air"
    ("no no yes", "no yes yes", 2 / 3, 2 / 3, 2 / 3),  # Counter intersection, with multiplicity
    ("two nodules", "2 nodules", 1.0, 1.0, 1.0),
])
def test_token_prf(prediction, answer, precision, recall, f1):
    p, r, f = metrics.token_prf(prediction, answer)
    assert (p, r, f) == pytest.approx((precision, recall, f1))
    assert metrics.token_f1(prediction, answer) == pytest.approx(f1)


OPTIONS = ("CT", "MRI", "CT with contrast", "X-ray")


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("Answer: C", "C"),
    ("answer: d", "D"),
    ("The answer is (D).", "D"),
    ("The correct option is B", "B"),
    ("B. MRI", "B"),
    ("C) CT with contrast", "C"),
    ("(A) CT", "A"),
    ("MRI", "B"),                                   # the option text itself
    ("mri.", "B"),
    ("It looks like a CT with contrast image", "C"),  # "CT" inside the longer option does not count
    ("x-ray", "D"),
    ("A large mass", None),                         # a leading article is not a letter
    ("the answer is a large mass", None),
    ("E", None),                                    # no fifth option
    ("CT or MRI", None),                            # two options mentioned
    ("", None),
    ("I cannot tell", None),
])
def test_parse_choice_letter(prediction, letter):
    assert metrics.parse_choice_letter(prediction, OPTIONS) == letter


@pytest.mark.parametrize("prediction, answer, options, correct", [
    ("The liver is in the left part of the image.", "the liver is in the left part of the image.", (), True),
    ("  the LIVER is in the left  part of the image ", "The liver is in the left part of the image.", (), True),
    ("The liver is in the right part of the image.", "The liver is in the left part of the image.", (), False),
    ("Yes, the liver is visible.", "yes", ("yes", "no"), True),
    ("No", "yes", ("yes", "no"), False),
    ("I am not sure", "yes", ("yes", "no"), False),
    ("left", "left", ("left", "right", "center"), True),
    ("The kidney is on the right.", "left", ("left", "right", "center"), False),
    ("B", "right", ("left", "right", "center"), True),
    ("(C)", "right", ("left", "right", "center"), False),
    ("The main organ shown is the spleen.", "The main organ shown is the spleen.",
     ("The main organ shown is the liver.", "The main organ shown is the spleen."), True),
    ("A", "The main organ shown is the spleen.",
     ("The main organ shown is the liver.", "The main organ shown is the spleen."), False),
])
def test_in_domain_correct(prediction, answer, options, correct):
    assert metrics.in_domain_correct(prediction, answer, options) is correct


def _example(i, answer, answer_type, match="vqa", options=()):
    return BenchmarkExample(id=str(i), image=f"{i}.png", question="q?", answer=answer, answer_type=answer_type,
                            options=options, match=match)


def test_score_counts_every_yes_no_example_in_the_denominator():
    examples = [_example(0, "yes", "closed"), _example(1, "no", "closed"), _example(2, "yes", "closed"),
                _example(3, "left", "closed")]
    predictions = ["yes", "yes", "the image shows an aneurysm", "left"]
    result = metrics.score(examples, predictions)
    # LLaVA-Med's script would report 2/2 here (wrong yes/no dropped); App. B.4 counts all four.
    assert result["closed"] == {"count": 4, "accuracy": 0.5}
    assert result["closed_yes_no"] == {"count": 3, "accuracy": pytest.approx(1 / 3)}
    assert [s.correct for s in result["per_example"]] == [True, False, False, True]
    assert [s.parsed for s in result["per_example"]] == ["yes", "yes", None, None]
    assert "open" not in result


def test_score_splits_closed_and_open_with_counts():
    examples = [_example(0, "yes", "closed"), _example(1, "right temporal lobe", "open", "f1"),
                _example(2, "free air", "open", "f1"), _example(3, "B", "closed", "letter", OPTIONS)]
    predictions = ["no", "temporal lobe", "Free air.", "Answer: B"]
    result = metrics.score(examples, predictions)
    assert result["count"] == 4
    assert result["closed"] == {"count": 2, "accuracy": 0.5}
    assert result["open"]["count"] == 2
    assert result["open"]["token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert result["open"]["token_recall"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert result["open"]["accuracy"] == 0.5          # exact match, only "free air"
    assert result["overall"] == {"count": 4, "accuracy": 0.5}
    assert metrics.headline(result) == {"acc_closed": 0.5, "token_f1_open": pytest.approx(0.9)}
    assert result["per_example"][3].parsed == "B"


@pytest.mark.parametrize("match, answer, options, prediction, correct", [
    ("vqa", "yes", (), "Yes.", True),
    ("letter", "C", OPTIONS, "CT with contrast", True),
    ("letter", "C", OPTIONS, "not sure", False),     # unparseable counts as wrong
    ("exact", "yes", ("yes", "no"), "yes, it is", True),
    ("f1", "free air", (), "free air", True),
])
def test_score_example_dispatches_on_match(match, answer, options, prediction, correct):
    example = _example(0, answer, "open" if match == "f1" else "closed", match, options)
    assert metrics.score_example(example, prediction).correct is correct


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        metrics.score([_example(0, "yes", "closed"), _example(1, "no", "closed")], ["yes"])


def test_score_of_none_prediction_is_wrong():
    result = metrics.score([_example(0, "yes", "closed"), _example(1, "air", "open", "f1")], [None, None])
    assert result["overall"]["accuracy"] == 0.0
    assert result["open"]["token_f1"] == 0.0
    assert collections.Counter(s.correct for s in result["per_example"]) == {False: 2}
