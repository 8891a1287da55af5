"""Evaluation reports: per-example predictions (JSONL), metrics (JSON, markdown) and the K sweep (JSON + PNG).

One benchmark run (`write_report`) writes, under `out_dir`:
  {name}.predictions.jsonl   one line per example: id, question, answer, prediction, answer_type, match, correct,
                             f1, recall, parsed, latent_steps, latency_ms
  {name}.metrics.json        {"benchmark", "count", "overall", "closed", "open", "closed_yes_no", "headline",
                             "latency_ms": {mean, p50, p90, min, max}, "meta": {...}}
  {name}.metrics.md          the same as a markdown table
Several runs are summarised by `write_summary` (summary.md, one row per benchmark). The K sweep (`write_k_sweep`,
the analogue of the paper's Figure 4) writes k_sweep.json and k_sweep.png: (a) accuracy against mean latency, one
point per K plus optional baselines (e.g. explicit CoT), (b) latency by K (stacked by phase when given), (c)
accuracy against K. Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from vital_jax.eval import metrics as metrics_lib
from vital_jax.eval import plot

PANEL_SIZE = (480, 360)
PANEL_GAP = 8
PREDICTIONS_SUFFIX, METRICS_JSON_SUFFIX, METRICS_MD_SUFFIX = ".predictions.jsonl", ".metrics.json", ".metrics.md"
SUMMARY_FILE, K_SWEEP_JSON, K_SWEEP_PNG = "summary.md", "k_sweep.json", "k_sweep.png"


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` to `path` via a temporary file in the same directory, fsync and rename; returns the path."""
    return plot.atomic_write(path, lambda f: f.write(text))


def _per_example(values, n: int, name: str) -> list:
    """A scalar (or None) broadcast to n, or a sequence that must have n entries."""
    if values is None or isinstance(values, (int, float)):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} examples")
    return values


def latency_summary(latency_ms: Sequence[float]) -> dict | None:
    """{mean, p50, p90, min, max, count} of per-example latencies in ms (None entries ignored), or None."""
    values = np.asarray([v for v in latency_ms if v is not None], np.float64)
    if values.size == 0:
        return None
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "min": float(values.min()), "max": float(values.max()),
            "count": int(values.size)}


def prediction_rows(examples: Sequence, predictions: Sequence[str], scores: Sequence | None = None,
                    latent_steps=None, latency_ms=None) -> list[dict]:
    """The JSON objects of the predictions file (see the module docstring); scores are computed when not given."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if scores is None:
        scores = [metrics_lib.score_example(e, p) for e, p in zip(examples, predictions)]
    steps = _per_example(latent_steps, len(examples), "latent_steps")
    latency = _per_example(latency_ms, len(examples), "latency_ms")
    rows = []
    for e, p, s, k, ms in zip(examples, predictions, scores, steps, latency):
        rows.append({"id": e.id, "question": e.question, "answer": e.answer, "prediction": p,
                     "answer_type": e.answer_type, "match": e.match, "correct": bool(s.correct), "f1": s.f1,
                     "recall": s.recall, "parsed": s.parsed, "latent_steps": k,
                     "latency_ms": None if ms is None else float(ms)})
    return rows


def write_predictions(path: str, examples: Sequence, predictions: Sequence[str], scores: Sequence | None = None,
                      latent_steps=None, latency_ms=None) -> str:
    """Per-example predictions as JSONL (one object per example, in order)."""
    rows = prediction_rows(examples, predictions, scores, latent_steps, latency_ms)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def summarize(name: str, scored: dict, latency_ms=None, meta: Mapping | None = None) -> dict:
    """The JSON-ready metrics of one run: `metrics.score`'s output without per-example scores, plus the headline
    numbers, a latency summary and free-form `meta` (model, split, K, ...)."""
    out = {"benchmark": name, "count": scored["count"]}
    out.update({k: v for k, v in scored.items() if k not in ("count", "per_example")})
    out["headline"] = metrics_lib.headline(scored)
    if latency_ms is not None and not isinstance(latency_ms, (int, float)):
        out["latency_ms"] = latency_summary(latency_ms)
    out["meta"] = dict(meta or {})
    return out


def write_metrics_json(path: str, summary: dict) -> str:
    """The metrics summary (`summarize`) as indented JSON."""
    return atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def metrics_table(summaries: Sequence[dict]) -> str:
    """A markdown table, one row per run summary: Acc_closed and Token-F1_open (%, with counts), overall
    accuracy, yes/no accuracy and mean latency."""
    header = ("| benchmark | split | K | n | Acc closed (%) | n closed | Token-F1 open (%) | recall open (%) | "
              "n open | Acc overall (%) | Acc yes/no (%) | latency mean (ms) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        closed, open_, yes_no = s.get("closed", {}), s.get("open", {}), s.get("closed_yes_no", {})
        latency = s.get("latency_ms") or {}
        meta = s.get("meta", {})
        cells = [s["benchmark"], str(meta.get("split", "")), str(meta.get("latent_steps", "")), str(s["count"]),
                 _pct(closed.get("accuracy")), str(closed.get("count", 0)), _pct(open_.get("token_f1")),
                 _pct(open_.get("token_recall")), str(open_.get("count", 0)), _pct(s["overall"]["accuracy"]),
                 _pct(yes_no.get("accuracy")), "–" if not latency else f"{latency['mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_markdown(path: str, summaries: Sequence[dict] | dict, title: str | None = None) -> str:
    """`metrics_table` of one summary or several, under an optional heading."""
    if isinstance(summaries, dict):
        summaries = [summaries]
    text = (f"# {title}\n\n" if title else "") + metrics_table(summaries)
    return atomic_write_text(path, text)


def write_report(out_dir: str, name: str, examples: Sequence, predictions: Sequence[str], *, latent_steps=None,
                 latency_ms=None, meta: Mapping | None = None) -> dict:
    """Score a run and write its three files (module docstring); returns the metrics summary.

    `latent_steps` is the K used (one int, or one per example); `latency_ms` one float per example (or None).
    """
    scored = metrics_lib.score(examples, predictions)
    meta = dict(meta or {})
    if latent_steps is not None and isinstance(latent_steps, int):
        meta.setdefault("latent_steps", latent_steps)
    summary = summarize(name, scored, latency_ms, meta)
    write_predictions(os.path.join(out_dir, name + PREDICTIONS_SUFFIX), examples, predictions,
                      scored["per_example"], latent_steps, latency_ms)
    write_metrics_json(os.path.join(out_dir, name + METRICS_JSON_SUFFIX), summary)
    write_metrics_markdown(os.path.join(out_dir, name + METRICS_MD_SUFFIX), summary, title=name)
    return summary


def write_summary(out_dir: str, summaries: Sequence[dict], title: str = "Evaluation") -> str:
    """summary.md: one table row per benchmark run."""
    return write_metrics_markdown(os.path.join(out_dir, SUMMARY_FILE), list(summaries), title=title)


# ------------------------------------------------------------------------------------------------------- K sweep

@dataclasses.dataclass(frozen=True)
class KSweepPoint:
    """The result of one evaluation at K = `latent_steps`: `accuracy` in [0, 1], per-sample `latency_ms`, and
    optionally the mean latency per phase (`latency_breakdown_ms`, e.g. {"prefill", "latent", "decode"})."""

    latent_steps: int
    accuracy: float
    latency_ms: tuple[float, ...]
    count: int | None = None
    latency_breakdown_ms: Mapping[str, float] | None = None

    def __post_init__(self):
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"K={self.latent_steps}: accuracy must be a fraction in [0, 1], got {self.accuracy}")
        if not self.latency_ms:
            raise ValueError(f"K={self.latent_steps}: no latency samples")
        object.__setattr__(self, "latency_ms", tuple(float(v) for v in self.latency_ms))

    @classmethod
    def from_run(cls, latent_steps: int, correct: Sequence[bool], latency_ms: Sequence[float],
                 latency_breakdown_ms: Mapping[str, float] | None = None) -> "KSweepPoint":
        """From per-sample correctness and latency of one run."""
        if not correct:
            raise ValueError(f"K={latent_steps}: no samples")
        return cls(latent_steps, sum(map(bool, correct)) / len(correct), tuple(latency_ms), len(correct),
                   latency_breakdown_ms)


def k_sweep_summary(points: Sequence[KSweepPoint], baselines: Mapping[str, tuple[float, float]] | None = None
                    ) -> dict:
    """JSON-ready sweep: per K accuracy, latency summary and, when K = 0 is present, the accuracy gain (points)
    and latency ratio against it; `baselines` maps a name to (accuracy, mean latency ms)."""
    points = sorted(points, key=lambda p: p.latent_steps)
    ks = [p.latent_steps for p in points]
    if len(set(ks)) != len(ks):
        raise ValueError(f"duplicate K values in the sweep: {ks}")
    direct = next((p for p in points if p.latent_steps == 0), None)
    rows = []
    for p in points:
        row = {"latent_steps": p.latent_steps, "accuracy": p.accuracy, "count": p.count,
               "latency_ms": latency_summary(p.latency_ms)}
        if p.latency_breakdown_ms:
            row["latency_breakdown_ms"] = dict(p.latency_breakdown_ms)
        if direct is not None:
            row["accuracy_gain_vs_k0"] = p.accuracy - direct.accuracy
            row["latency_ratio_vs_k0"] = row["latency_ms"]["mean"] / latency_summary(direct.latency_ms)["mean"]
        rows.append(row)
    out = {"points": rows}
    if baselines:
        out["baselines"] = {name: {"accuracy": float(a), "latency_ms_mean": float(ms)}
                            for name, (a, ms) in baselines.items()}
    return out


def k_sweep_figure(points: Sequence[KSweepPoint], baselines: Mapping[str, tuple[float, float]] | None = None,
                   title: str = "") -> "plot.Image.Image":
    """Three panels of PANEL_SIZE side by side (the analogue of Figure 4): (a) accuracy vs latency, (b) latency
    by K, (c) accuracy vs K."""
    points = sorted(points, key=lambda p: p.latent_steps)
    ks = [p.latent_steps for p in points]
    accs = [100 * p.accuracy for p in points]
    means = [float(np.mean(p.latency_ms)) for p in points]
    prefix = f"{title}: " if title else ""
    series = [plot.Series("latent (K)", means, accs)]
    labels = [[f"K={k}" for k in ks]]
    for i, (name, (acc, ms)) in enumerate((baselines or {}).items()):
        series.append(plot.Series(name, [float(ms)], [100 * float(acc)], plot.PALETTE[(i + 1) % len(plot.PALETTE)]))
        labels.append([name])
    all_acc = [y for s in series for y in s.y]
    y_range = (min(all_acc + [0.0]), max(all_acc + [100.0]))
    all_ms = [x for s in series for x in s.x]
    # A log latency axis once the points span more than 5x (explicit CoT is ~100x slower in the paper).
    x_log = min(all_ms) > 0 and max(all_ms) / min(all_ms) > 5
    panel_a = plot.line_chart(series, x_label="mean latency (ms)" + (", log scale" if x_log else ""),
                              y_label="accuracy (%)", title=f"{prefix}(a) accuracy vs latency", size=PANEL_SIZE,
                              y_range=y_range, point_labels=labels, legend=bool(baselines), x_log=x_log)
    phases = [p.latency_breakdown_ms for p in points]
    if all(phases) and len({tuple(ph) for ph in phases}) == 1:
        bars = [plot.Series(name, ks, [float(ph[name]) for ph in phases]) for name in phases[0]]
        stacked = True
    else:
        bars, stacked = [plot.Series("mean latency", ks, means)], False
    panel_b = plot.bar_chart([str(k) for k in ks], bars, x_label="latent steps K", y_label="latency (ms)",
                             title=f"{prefix}(b) latency by K", size=PANEL_SIZE, stacked=stacked,
                             value_labels=not stacked)
    panel_c = plot.line_chart([plot.Series("accuracy", ks, accs)], x_label="latent steps K",
                              y_label="accuracy (%)", title=f"{prefix}(c) accuracy vs K", size=PANEL_SIZE,
                              x_ticks=ks if len(ks) > 1 else None, legend=False)
    return plot.hstack([panel_a, panel_b, panel_c], gap=PANEL_GAP)


def write_k_sweep(out_dir: str, points: Sequence[KSweepPoint],
                  baselines: Mapping[str, tuple[float, float]] | None = None, title: str = "") -> tuple[str, str]:
    """k_sweep.json (`k_sweep_summary`) and k_sweep.png (`k_sweep_figure`) under out_dir; returns their paths."""
    if not points:
        raise ValueError("the K sweep needs at least one point")
    summary = k_sweep_summary(points, baselines)
    json_path = atomic_write_text(os.path.join(out_dir, K_SWEEP_JSON), json.dumps(summary, indent=2) + "\n")
    png_path = plot.save_png(k_sweep_figure(points, baselines, title), os.path.join(out_dir, K_SWEEP_PNG))
    return json_path, png_path
