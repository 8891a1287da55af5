"""Report files (predictions JSONL, metrics JSON/markdown, K sweep JSON and figure)."""

import json
import os

import pytest
from matplotlib.container import BarContainer

from vital_jax.eval import report
from vital_jax.eval.benchmarks import BenchmarkExample
from vital_jax.eval.report import KSweepPoint


def _examples():
    return [
        BenchmarkExample(id="q1", image="1.png", question="Is there an effusion?", answer="yes",
                         answer_type="closed"),
        BenchmarkExample(id="q2", image="2.png", question="Is it normal?", answer="no", answer_type="closed"),
        BenchmarkExample(id="q3", image="3.png", question="Where is the lesion?", answer="right temporal lobe",
                         answer_type="open", match="f1"),
    ]


def test_write_report_files_and_content(tmp_path):
    examples, predictions = _examples(), ["Yes.", "not sure", "temporal lobe"]
    latency = [120.0, 80.0, 100.0]
    summary = report.write_report(str(tmp_path), "rad", examples, predictions, latent_steps=4, latency_ms=latency,
                                  meta={"split": "test", "model": "tiny"}, batched_ms_per_example=[40.0] * 3,
                                  batch_size=4)
    names = sorted(os.listdir(tmp_path))
    assert names == ["rad.metrics.json", "rad.metrics.md", "rad.predictions.jsonl"]   # no temporary files left

    lines = (tmp_path / "rad.predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert [r["prediction"] for r in rows] == predictions
    assert rows[0]["f1"] is None and rows[2]["f1"] == pytest.approx(0.8)
    assert rows[1]["parsed"] is None and rows[0]["parsed"] == "yes"
    assert {r["latent_steps"] for r in rows} == {4}
    assert [r["latency_ms"] for r in rows] == latency
    assert set(rows[0]) >= {"id", "question", "answer", "prediction", "correct", "f1", "latent_steps", "latency_ms"}

    saved = json.loads((tmp_path / "rad.metrics.json").read_text())
    assert saved == summary
    assert saved["closed"] == {"count": 2, "accuracy": 0.5}
    assert saved["open"]["token_f1"] == pytest.approx(0.8)
    assert saved["headline"] == {"acc_closed": 0.5, "accuracy_over_all": saved["overall"]["accuracy"],
                                 "closed_majority_baseline": 0.5, "token_f1_open": pytest.approx(0.8)}
    # Closed accuracy, accuracy over all questions, the majority baseline beside them, open token F1.
    assert saved["closed_accuracy"] == 0.5 and saved["closed_majority_baseline"] == 0.5
    assert saved["open_token_f1"] == pytest.approx(0.8)
    assert saved["latency_ms"]["mean"] == pytest.approx(100.0) and saved["latency_ms"]["p50"] == pytest.approx(100.0)
    assert saved["latency_ms"]["batch_size"] == 1
    assert saved["batched_ms_per_example"]["mean"] == 40.0 and saved["batched_ms_per_example"]["batch_size"] == 4
    assert saved["meta"] == {"split": "test", "model": "tiny", "latent_steps": 4}
    assert "per_example" not in saved

    table = (tmp_path / "rad.metrics.md").read_text().splitlines()
    assert table[0] == "# rad"
    header = [c.strip() for c in table[2].strip("|").split("|")]
    row = dict(zip(header, [c.strip() for c in table[4].strip("|").split("|")]))
    assert row["benchmark"] == "rad" and row["K"] == "4" and row["n"] == "3"
    assert row["Acc closed (%)"] == "50.00" and row["Token-F1 open (%)"] == "80.00"
    assert row["majority closed (%)"] == "50.00" and "Acc closed / all (%)" not in row
    assert row["latency batch 1 (ms)"] == "100.0" and row["batched (ms/example)"] == "40.0 (batch 4)"
    assert [r["batched_ms_per_example"] for r in rows] == [40.0] * 3


def test_write_summary_has_one_row_per_run(tmp_path):
    examples = _examples()
    a = report.write_report(str(tmp_path), "a", examples, ["yes", "no", "right temporal lobe"])
    b = report.write_report(str(tmp_path), "b", examples[:2], ["no", "no"])
    path = report.write_summary(str(tmp_path), [a, b])
    lines = open(path).read().splitlines()
    body = [line for line in lines if line.startswith("| a ") or line.startswith("| b ")]
    assert len(body) == 2
    assert "| – |" in body[1]            # b has no open questions


@pytest.mark.parametrize("latent_steps, latency, message", [
    ([1, 2], None, "latent_steps: 2 values for 3 examples"),
    (None, [1.0], "latency_ms: 1 values for 3 examples"),
])
def test_write_predictions_rejects_misaligned_columns(tmp_path, latent_steps, latency, message):
    with pytest.raises(ValueError, match=message):
        report.write_predictions(str(tmp_path / "p.jsonl"), _examples(), ["a", "b", "c"],
                                 latent_steps=latent_steps, latency_ms=latency)
    assert not os.path.exists(tmp_path / "p.jsonl")


def _sweep():
    # Accuracy rises with K, latency grows by 10 ms per step over a 200 ms base.
    return [KSweepPoint.from_run(k, [True] * (5 + k) + [False] * (5 - k), [200.0 + 10 * k, 220.0 + 10 * k])
            for k in range(5)]


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def _is_format(path: str, fmt: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return b"<svg" in head if fmt == "svg" else head.startswith(MAGIC[fmt])


def test_k_sweep_json_and_figure(tmp_path):
    json_path, figure_path = report.write_k_sweep(str(tmp_path), _sweep(),
                                                  baselines={"explicit CoT": (0.4, 3000.0)}, title="in-domain")
    saved = json.loads(open(json_path).read())
    assert [p["latent_steps"] for p in saved["points"]] == [0, 1, 2, 3, 4]
    assert [p["closed_accuracy"] for p in saved["points"]] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [p["closed_count"] for p in saved["points"]] == [10] * 5
    assert {p["latency_ms"]["batch_size"] for p in saved["points"]} == {1}
    assert [p["latency_ms"]["mean"] for p in saved["points"]] == pytest.approx([210, 220, 230, 240, 250])
    assert saved["points"][4]["accuracy_gain_vs_k0"] == pytest.approx(0.4)
    assert saved["points"][4]["latency_ratio_vs_k0"] == pytest.approx(250 / 210)
    assert saved["baselines"] == {"explicit CoT": {"accuracy": 0.4, "latency_ms_mean": 3000.0}}

    assert figure_path == str(tmp_path / "k_sweep.png") and _is_format(figure_path, "png")
    assert sorted(os.listdir(tmp_path)) == ["k_sweep.json", "k_sweep.png"]     # no temporary files left
    fig = report.k_sweep_figure(_sweep(), baselines={"explicit CoT": (0.4, 3000.0)}, title="in-domain")
    ax_a, ax_b, ax_c = fig.axes
    assert fig._suptitle.get_text() == "in-domain"
    latent, cot = ax_a.get_lines()
    assert list(latent.get_ydata()) == pytest.approx([50, 60, 70, 80, 90])
    assert list(cot.get_xdata()) == [3000.0] and list(cot.get_ydata()) == pytest.approx([40.0])
    assert ax_a.get_xscale() == "log"                          # CoT is 14x slower than K=0: a log latency axis
    assert [t.get_text() for t in ax_a.get_legend().get_texts()] == ["latent (K)", "explicit CoT"]
    assert [bar.get_height() for bar in ax_b.patches] == pytest.approx([210, 220, 230, 240, 250])
    assert list(ax_c.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4]
    assert "closed accuracy" in ax_c.get_ylabel()


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_k_sweep_figure_has_the_requested_format(tmp_path, fmt):
    _, path = report.write_k_sweep(str(tmp_path), _sweep(), figure_format=fmt)
    assert path == str(tmp_path / f"k_sweep.{fmt}") and os.path.getsize(path) > 1000
    assert _is_format(path, fmt)
    assert all(not _is_format(path, other) for other in ("png", "pdf", "svg") if other != fmt)


def test_k_sweep_rejects_an_unknown_figure_format_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown figure format 'gif'"):
        report.write_k_sweep(str(tmp_path), _sweep(), figure_format="gif")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("accuracy, open_f1", [(0.0, None), (None, 0.0), (0.02, None), (1.0, None)])
def test_k_sweep_accuracy_axes_stay_inside_0_to_100(accuracy, open_f1):
    points = [KSweepPoint(k, accuracy, (100.0 + k,), open_token_f1=open_f1) for k in range(4)]
    ax_a, _, ax_c = report.k_sweep_figure(points).axes
    for ax in (ax_a, ax_c):
        lo, hi = ax.get_ylim()
        assert 0.0 <= lo < hi <= 100.0
        if accuracy == 0.0 or open_f1 == 0.0:
            assert lo == 0.0                                   # every accuracy is 0: the axis starts at 0
    assert ax_a.get_xscale() == "linear"                       # latencies within 5x of each other


def test_k_sweep_keeps_closed_accuracy_and_open_f1_apart_and_labels_latency(tmp_path):
    from vital_jax.eval import metrics
    examples = _examples()
    points = []
    for k, predictions in enumerate((["no", "no", "right temporal lobe"], ["yes", "no", "temporal lobe"])):
        scored = metrics.score(examples, predictions)
        points.append(KSweepPoint.from_scores(k, scored, [300.0 + k], batched_ms_per_example=[90.0, 95.0],
                                              batch_size=4))
    saved = json.loads(open(report.write_k_sweep(str(tmp_path), points)[0]).read())
    first, second = saved["points"]
    # K=0 gets the open question exactly right: the old mixed accuracy was 2/3 at both K; closed accuracy is not.
    assert (first["closed_accuracy"], second["closed_accuracy"]) == (0.5, 1.0)
    assert first["closed_count"] == 2
    assert (first["open_token_f1"], second["open_token_f1"]) == pytest.approx((1.0, 0.8))
    assert first["latency_ms"] == {"mean": 300.0, "p50": 300.0, "p90": 300.0, "min": 300.0, "max": 300.0,
                                   "count": 1, "batch_size": 1}
    assert second["batched_ms_per_example"]["mean"] == 92.5 and second["batched_ms_per_example"]["batch_size"] == 4
    assert second["accuracy_gain_vs_k0"] == 0.5


def test_metrics_markdown_has_a_per_source_table(tmp_path):
    examples = [BenchmarkExample(id=str(i), image="x.png", question="q?", answer="yes", answer_type="closed",
                                 options=("yes", "no"), match="exact", extra={"source": source})
                for i, source in enumerate(("MSD Task03_Liver", "biomedparse", "biomedparse"))]
    report.write_report(str(tmp_path), "in_domain", examples, ["yes", "no", "yes"], latent_steps=4)
    text = (tmp_path / "in_domain.metrics.md").read_text()
    assert "| benchmark | K | source | n closed | Acc closed (%) | n open | Token-F1 open (%) |" in text
    assert "| in_domain | 4 | BiomedParse | 2 | 50.00 | 0 | – |" in text
    assert "| in_domain | 4 | MSD | 1 | 100.00 | 0 | – |" in text
    assert report.TABLE_NOTES in text
    assert "counted on the evaluated split itself" in report.TABLE_NOTES


def test_per_type_and_per_source_lines_keep_closed_accuracy_and_open_token_f1_apart(tmp_path):
    def example(i, qtype, answer, answer_type):
        return BenchmarkExample(id=str(i), image="x.png", question="q?", answer=answer, answer_type=answer_type,
                                match="vqa" if answer_type == "closed" else "f1",
                                extra={"question_type": qtype, "source": "phantom"})
    examples = [example(0, "PRES", "yes", "closed"), example(1, "PRES", "no", "closed"),
                example(2, "PRES", "free air", "open"), example(3, "describe", "right temporal lobe", "open")]
    summary = report.write_report(str(tmp_path), "rad", examples, ["yes", "yes", "air", "temporal lobe"],
                                  meta={"split": "test"})
    lines = report.headline_text(summary).splitlines()
    assert "  PRES       50.0% closed, n=2; 66.7% token F1 open, n=1" in lines
    assert "  describe   80.0% token F1 open, n=1" in lines
    assert not any("open ones" in line for line in lines)        # the pooled "PRES 33.3% (open ones: ...)" line
    text = (tmp_path / "rad.metrics.md").read_text()
    assert "| rad |  | phantom | 2 | 50.00 | 2 | 73.33 |" in text


def test_k_sweep_stacks_latency_phases_and_rejects_bad_points():
    points = [KSweepPoint(k, 0.5, (1.0,), latency_breakdown_ms={"prefill": 100.0, "latent": 10.0 * k,
                                                                   "decode": 50.0}) for k in range(3)]
    summary = report.k_sweep_summary(points)
    assert summary["points"][2]["latency_breakdown_ms"] == {"prefill": 100.0, "latent": 20.0, "decode": 50.0}
    ax_b = report.k_sweep_figure(points).axes[1]
    stacks = [c for c in ax_b.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in stacks] == ["prefill", "latent", "decode"]          # one bar series per phase
    assert [bar.get_y() for bar in stacks[2]] == pytest.approx([100.0, 110.0, 120.0])  # decode on top
    assert [t.get_text() for t in ax_b.get_legend().get_texts()] == ["prefill", "latent", "decode"]
    with pytest.raises(ValueError, match="duplicate K"):
        report.k_sweep_summary(points + [points[0]])
    with pytest.raises(ValueError, match="fraction"):
        KSweepPoint(1, 81.0, (1.0,))
    with pytest.raises(ValueError, match="neither"):
        KSweepPoint(1, None, (1.0,))
    with pytest.raises(ValueError, match="no latency samples"):
        KSweepPoint(1, 0.5, ())
