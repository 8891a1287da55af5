"""Report files (predictions JSONL, metrics JSON/markdown, K sweep JSON/PNG) and the PIL chart helpers."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vital_jax.eval import plot, report
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
    assert saved["headline"] == {"acc_closed": 0.5, "closed_accuracy_over_all": pytest.approx(1 / 3),
                                 "closed_majority_baseline": 0.5, "token_f1_open": pytest.approx(0.8)}
    # Closed accuracy two ways, the majority baseline beside it, open token F1 (issues #17, #18).
    assert saved["closed_accuracy"] == 0.5 and saved["closed_accuracy_over_all"] == pytest.approx(1 / 3)
    assert saved["closed_majority_baseline"] == 0.5 and saved["closed_majority_baseline_over_all"] == pytest.approx(
        1 / 3)
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
    assert row["Acc closed / all (%)"] == "33.33" and row["majority closed (%)"] == "50.00"
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


def test_k_sweep_json_and_png(tmp_path):
    json_path, png_path = report.write_k_sweep(str(tmp_path), _sweep(), baselines={"explicit CoT": (0.4, 3000.0)},
                                               title="in-domain")
    saved = json.loads(open(json_path).read())
    assert [p["latent_steps"] for p in saved["points"]] == [0, 1, 2, 3, 4]
    assert [p["closed_accuracy"] for p in saved["points"]] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [p["closed_count"] for p in saved["points"]] == [10] * 5
    assert {p["latency_ms"]["batch_size"] for p in saved["points"]} == {1}
    assert [p["latency_ms"]["mean"] for p in saved["points"]] == pytest.approx([210, 220, 230, 240, 250])
    assert saved["points"][4]["accuracy_gain_vs_k0"] == pytest.approx(0.4)
    assert saved["points"][4]["latency_ratio_vs_k0"] == pytest.approx(250 / 210)
    assert saved["baselines"] == {"explicit CoT": {"accuracy": 0.4, "latency_ms_mean": 3000.0}}

    with Image.open(png_path) as image:
        assert image.format == "PNG"
        assert image.size == (3 * report.PANEL_SIZE[0] + 2 * report.PANEL_GAP, report.PANEL_SIZE[1])
        pixels = np.asarray(image.convert("RGB"))
    # Something was drawn in every panel: each holds the series colour, not only white and ink.
    blue = np.all(pixels == plot.PALETTE[0], axis=-1)
    for i in range(3):
        left = i * (report.PANEL_SIZE[0] + report.PANEL_GAP)
        assert blue[:, left:left + report.PANEL_SIZE[0]].sum() > 20


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
    assert "| in_domain | 4 | BiomedParse | 2 | 50.00 |" in text and "| in_domain | 4 | MSD | 1 | 100.00 |" in text
    assert report.TABLE_NOTES in text


def test_k_sweep_stacks_latency_phases_and_rejects_bad_points():
    points = [KSweepPoint(k, 0.5, (1.0,), latency_breakdown_ms={"prefill": 100.0, "latent": 10.0 * k,
                                                                   "decode": 50.0}) for k in range(3)]
    summary = report.k_sweep_summary(points)
    assert summary["points"][2]["latency_breakdown_ms"] == {"prefill": 100.0, "latent": 20.0, "decode": 50.0}
    image = report.k_sweep_figure(points)
    pixels = np.asarray(image)
    for color in plot.PALETTE[:3]:                   # one colour per phase
        assert np.all(pixels == color, axis=-1).sum() > 20
    with pytest.raises(ValueError, match="duplicate K"):
        report.k_sweep_summary(points + [points[0]])
    with pytest.raises(ValueError, match="fraction"):
        KSweepPoint(1, 81.0, (1.0,))
    with pytest.raises(ValueError, match="neither"):
        KSweepPoint(1, None, (1.0,))
    with pytest.raises(ValueError, match="no latency samples"):
        KSweepPoint(1, 0.5, ())


# ---------------------------------------------------------------------------------------------------------- plots

@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.0, 100.0), (41.5, 81.1), (200.0, 3410.0), (-3.0, 7.0),
                                    (5.0, 5.0), (0.0, 0.0), (0.001, 0.004)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    ticks = plot.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    assert 2 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


@pytest.mark.parametrize("size", [(480, 360), (300, 200)])
def test_charts_have_the_requested_size(size):
    line = plot.line_chart([plot.Series("a", [0, 1, 2], [1.0, 3.0, 2.0]), plot.Series("b", [0, 2], [2.0, 2.5])],
                           x_label="K", y_label="acc", title="t", size=size)
    bars = plot.bar_chart(["0", "1"], [plot.Series("ms", [0, 1], [3.0, 4.0])], size=size, value_labels=True)
    assert line.size == size and bars.size == size
    assert np.all(np.asarray(line) == plot.PALETTE[1], axis=-1).any()     # the second series is drawn


def test_chart_inputs_are_checked():
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        plot.line_chart([plot.Series("a", [0, 1], [1.0])])
    with pytest.raises(ValueError, match="1 values for 2 labels"):
        plot.bar_chart(["0", "1"], [plot.Series("a", [0], [1.0])])


def test_colormap_endpoints_and_monotone_brightness():
    table = plot.apply_colormap(np.array([0.0, 1.0, -5.0, 7.0, np.nan]), "viridis")
    assert table.dtype == np.uint8 and table.shape == (5, 3)
    assert tuple(table[0]) == plot.COLORMAPS["viridis"][0] and tuple(table[1]) == plot.COLORMAPS["viridis"][-1]
    assert tuple(table[2]) == tuple(table[0]) and tuple(table[3]) == tuple(table[1]) and tuple(table[4]) == tuple(
        table[0])
    ramp = plot.apply_colormap(np.linspace(0, 1, 50), "viridis").astype(float)
    brightness = ramp @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(brightness) > 0)                 # viridis is perceptually ordered
    with pytest.raises(ValueError, match="unknown colour map"):
        plot.apply_colormap(np.zeros(2), "hot")


def test_overlay_heatmap_blends_hot_cell_where_it_is(tmp_path):
    image = Image.new("RGB", (64, 48), (100, 100, 100))
    heat = np.zeros((4, 4), np.float32)
    heat[0, 3] = 1.0                                       # top-right cell
    out = plot.overlay_heatmap(image, heat, alpha=0.6, colormap="jet")
    assert out.size == (64, 48) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    top_right, bottom_left = pixels[2, 61], pixels[45, 2]
    low, high = np.array(plot.COLORMAPS["jet"][0]), np.array(plot.COLORMAPS["jet"][-1])
    assert np.allclose(bottom_left, np.round(100 * 0.4 + low * 0.6), atol=1)
    assert top_right[0] > bottom_left[0] + 60               # red end of jet where the heat is
    assert np.array_equal(np.asarray(plot.overlay_heatmap(image, heat, alpha=0.0)), np.asarray(image))
    path = plot.save_png(out, str(tmp_path / "sub" / "overlay.png"))
    with Image.open(path) as reread:
        assert reread.size == (64, 48)
    with pytest.raises(ValueError, match="2-D"):
        plot.overlay_heatmap(image, np.zeros((2, 2, 2)))


@pytest.mark.parametrize("lo, hi", [(200.0, 3410.0), (210.0, 250.0), (1.0, 1.0), (3.0, 70000.0), (0.5, 0.9)])
def test_log_ticks_bracket_the_range_with_powers_of_ten_multiples(lo, hi):
    ticks = plot.log_ticks(lo, hi)
    assert len(ticks) >= 2 and ticks == sorted(ticks)
    assert ticks[0] <= lo and ticks[-1] >= hi
    for t in ticks:
        mantissa = t / 10 ** np.floor(np.log10(t) + 1e-12)
        assert any(np.isclose(mantissa, m) for m in (1, 2, 5))
    with pytest.raises(ValueError, match="positive"):
        plot.log_ticks(0.0, 10.0)


def test_log_x_axis_places_decades_evenly():
    colors = [(255, 0, 0), (0, 200, 0), (0, 0, 255)]
    series = [plot.Series(str(x), [x], [1.0], color=c) for x, c in zip((10.0, 100.0, 1000.0), colors)]
    image = np.asarray(plot.line_chart(series, size=(400, 300), x_log=True, legend=False, y_range=(0.0, 2.0)))
    centres = [np.argwhere(np.all(image == c, axis=-1))[:, 1].mean() for c in colors]
    assert centres[1] - centres[0] == pytest.approx(centres[2] - centres[1], abs=1.0)
    linear = np.asarray(plot.line_chart(series, size=(400, 300), legend=False, y_range=(0.0, 2.0)))
    centres = [np.argwhere(np.all(linear == c, axis=-1))[:, 1].mean() for c in colors]
    assert centres[2] - centres[1] > 5 * (centres[1] - centres[0])
