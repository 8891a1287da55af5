"""Evaluation reports: per-example predictions (JSONL), metrics (JSON, markdown) and the K sweep (JSON + figure).

One benchmark run (`write_report`) writes, under `out_dir`:
  {name}.predictions.jsonl   one line per example: id, question, answer, prediction, answer_type, match, correct,
                             f1, recall, parsed, latent_steps, latency_ms, batched_ms_per_example
  {name}.metrics.json        {"benchmark", "count", "overall", "closed", "open", "closed_yes_no", "per_source",
                             "closed_accuracy", "accuracy_over_all", "closed_majority_baseline",
                             "closed_majority_answer",
                             "closed_majority_by_type_baseline" (vital_jax datasets' types), "open_token_f1",
                             "headline", "latency_ms": {mean, p50, p90, min, max, count, batch_size: 1},
                             "batched_ms_per_example": {..., batch_size}, "meta": {...}} (`metrics.score`
                             documents the accuracy conventions)
  {name}.metrics.md          the same as a markdown table (and a per-source table for in-domain runs)
Latency is single-example latency (batch 1, compilation excluded), what the paper's Figure 4 reports; batched
time per example (a throughput figure) is kept apart under its own name.
Several runs are summarised by `write_summary` (summary.md, one row per benchmark). The K sweep (`write_k_sweep`,
the analogue of the paper's Figure 4) writes k_sweep.json and a matplotlib figure, k_sweep.png (or .pdf / .svg):
(a) closed accuracy against mean single-example latency, one point per K plus optional baselines (e.g. explicit
CoT), (b) latency by K (stacked by phase when given), (c) closed accuracy against K; open token F1 is reported
beside closed accuracy, never mixed into it. Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from matplotlib import ticker
from matplotlib.figure import Figure

from vital_jax.eval import figures
from vital_jax.eval import metrics as metrics_lib
from vital_jax.jsonio import atomic_write

PANEL_SIZE = (4.8, 3.6)  # inches per K-sweep panel
PREDICTIONS_SUFFIX, METRICS_JSON_SUFFIX, METRICS_MD_SUFFIX = ".predictions.jsonl", ".metrics.json", ".metrics.md"
SUMMARY_FILE, K_SWEEP_JSON = "summary.md", "k_sweep.json"
K_SWEEP_FIGURE = "k_sweep"  # + .png (default), .pdf or .svg


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` to `path` via a temporary file in the same directory, fsync and rename; returns the path."""
    return atomic_write(path, lambda f: f.write(text))


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
                    latent_steps=None, latency_ms=None, batched_ms_per_example=None) -> list[dict]:
    """The JSON objects of the predictions file (see the module docstring); scores are computed when not given.
    `latency_ms` is single-example latency (None for examples not timed alone), `batched_ms_per_example` the
    batch's time divided by its size."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if scores is None:
        scores = [metrics_lib.score_example(e, p) for e, p in zip(examples, predictions)]
    steps = _per_example(latent_steps, len(examples), "latent_steps")
    latency = _per_example(latency_ms, len(examples), "latency_ms")
    batched = _per_example(batched_ms_per_example, len(examples), "batched_ms_per_example")
    rows = []
    for e, p, s, k, ms, b in zip(examples, predictions, scores, steps, latency, batched):
        rows.append({"id": e.id, "question": e.question, "answer": e.answer, "prediction": p,
                     "answer_type": e.answer_type, "match": e.match, "correct": bool(s.correct), "f1": s.f1,
                     "recall": s.recall, "parsed": s.parsed, "latent_steps": k,
                     "latency_ms": None if ms is None else float(ms),
                     "batched_ms_per_example": None if b is None else float(b)})
    return rows


def write_predictions(path: str, examples: Sequence, predictions: Sequence[str], scores: Sequence | None = None,
                      latent_steps=None, latency_ms=None, batched_ms_per_example=None) -> str:
    """Per-example predictions as JSONL (one object per example, in order)."""
    rows = prediction_rows(examples, predictions, scores, latent_steps, latency_ms, batched_ms_per_example)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _timing(values, batch_size: int | None) -> dict | None:
    if values is None or isinstance(values, (int, float)):
        return None
    out = latency_summary(values)
    if out is not None and batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out


def summarize(name: str, scored: dict, latency_ms=None, meta: Mapping | None = None,
              batched_ms_per_example=None, batch_size: int | None = None) -> dict:
    """The JSON-ready metrics of one run: `metrics.score`'s output without per-example scores, plus the headline
    numbers, single-example `latency_ms` (batch 1), `batched_ms_per_example` (batches of `batch_size`; a
    throughput figure, not a latency) and free-form `meta` (model, split, K, ...)."""
    out = {"benchmark": name, "count": scored["count"]}
    out.update({k: v for k, v in scored.items() if k not in ("count", "per_example")})
    out["headline"] = metrics_lib.headline(scored)
    latency = _timing(latency_ms, 1)
    if latency is not None:
        out["latency_ms"] = latency
    batched = _timing(batched_ms_per_example, batch_size)
    if batched is not None:
        out["batched_ms_per_example"] = batched
    out["meta"] = dict(meta or {})
    return out


def write_metrics_json(path: str, summary: dict) -> str:
    """The metrics summary (`summarize`) as indented JSON."""
    return atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


TABLE_NOTES = (
    "Acc closed: correct closed answers / closed questions (B.4's Acc_closed). Acc overall: correct answers / all "
    "n questions, open ones by exact match: the scale of Table 1's VQA-RAD values (k/451). Majority closed: every "
    "closed question "
    "answered with the most frequent normalised ground truth, same scorer; majority answers (this one and the "
    "per-question-type one of vital_jax datasets) are counted on the evaluated split itself. Latency: one example "
    "at a time (batch 1, compilation excluded), as the paper's Figure 4; batched: a batch's time / its size "
    "(throughput).")


def metrics_table(summaries: Sequence[dict]) -> str:
    """A markdown table, one row per run summary: Acc_closed beside the majority baseline, Token-F1_open (%, with
    counts), overall accuracy (every question; open ones by exact match), yes/no accuracy, single-example latency
    and batched time per example."""
    header = ("| benchmark | split | K | n | Acc closed (%) | n closed | majority closed (%) | "
              "Token-F1 open (%) | recall open (%) | n open | Acc overall (%) | Acc yes/no (%) | "
              "latency batch 1 (ms) | batched (ms/example) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for s in summaries:
        closed, open_, yes_no = s.get("closed", {}), s.get("open", {}), s.get("closed_yes_no", {})
        latency, batched = s.get("latency_ms") or {}, s.get("batched_ms_per_example") or {}
        meta = s.get("meta", {})
        cells = [s["benchmark"], str(meta.get("split", "")), str(meta.get("latent_steps", "")), str(s["count"]),
                 _pct(closed.get("accuracy")), str(closed.get("count", 0)), _pct(s.get("closed_majority_baseline")),
                 _pct(open_.get("token_f1")), _pct(open_.get("token_recall")), str(open_.get("count", 0)),
                 _pct(s["overall"]["accuracy"]), _pct(yes_no.get("accuracy")), "–" if not latency else f"{latency['mean']:.1f}",
                 "–" if not batched else f"{batched['mean']:.1f}" + (
                     f" (batch {batched['batch_size']})" if "batch_size" in batched else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_source_table(summaries: Sequence[dict]) -> str:
    """A markdown table per source group (Table 1's in-domain MSD / BiomedParse rows), one row per run and group:
    closed accuracy over the group's closed questions and token F1 over its open ones, never pooled; empty when no
    run has per-source results."""
    rows = [(s, group, v) for s in summaries for group, v in (s.get("per_source") or {}).items()]
    if not rows:
        return ""
    lines = ["| benchmark | K | source | n closed | Acc closed (%) | n open | Token-F1 open (%) |",
             "|---|---|---|---|---|---|---|"]
    for s, group, v in rows:
        lines.append(f"| {s['benchmark']} | {s.get('meta', {}).get('latent_steps', '')} | {group} | "
                     f"{v['closed_count']} | {_pct(v.get('closed_accuracy'))} | {v['open_count']} | "
                     f"{_pct(v.get('open_token_f1'))} |")
    return "\n".join(lines) + "\n"


def write_metrics_markdown(path: str, summaries: Sequence[dict] | dict, title: str | None = None) -> str:
    """`metrics_table` of one summary or several, under an optional heading, its notes, and `per_source_table`
    when there are per-source results."""
    if isinstance(summaries, dict):
        summaries = [summaries]
    text = (f"# {title}\n\n" if title else "") + metrics_table(summaries) + "\n" + TABLE_NOTES + "\n"
    by_source = per_source_table(summaries)
    if by_source:
        text += "\nPer source:\n\n" + by_source
    return atomic_write_text(path, text)


# meta["latent_steps"] of a run that answered each example with its own K.
PER_EXAMPLE_K = "per record"


def write_report(out_dir: str, name: str, examples: Sequence, predictions: Sequence[str], *, latent_steps=None,
                 latency_ms=None, meta: Mapping | None = None, batched_ms_per_example=None,
                 batch_size: int | None = None) -> dict:
    """Score a run and write its three files (module docstring); returns the metrics summary.

    `latent_steps` is the K used (one int, or one per example); `latency_ms` the single-example latency (one
    float per example, None where not timed alone); `batched_ms_per_example` the batched time per example.
    """
    scored = metrics_lib.score(examples, predictions)
    meta = dict(meta or {})
    if latent_steps is not None:  # one K, or one per example (each question's own record K)
        meta.setdefault("latent_steps", latent_steps if isinstance(latent_steps, int) else PER_EXAMPLE_K)
    summary = summarize(name, scored, latency_ms, meta, batched_ms_per_example, batch_size)
    write_predictions(os.path.join(out_dir, name + PREDICTIONS_SUFFIX), examples, predictions,
                      scored["per_example"], latent_steps, latency_ms, batched_ms_per_example)
    write_metrics_json(os.path.join(out_dir, name + METRICS_JSON_SUFFIX), summary)
    write_metrics_markdown(os.path.join(out_dir, name + METRICS_MD_SUFFIX), summary, title=name)
    return summary


ACCURACY_MEANS = ("accuracy = the normalised answer equals the reference (closed questions: the option's text, the "
                  "yes/no stated or the option letter); open questions are scored by token F1")


def headline_text(summary: dict) -> str:
    """A run's headline numbers as a few lines for the terminal: overall, closed (beside the majority-answer,
    per-type majority (vital_jax datasets) and chance floors), open, each question type (its closed
    accuracy and its open token F1, apart), and latency."""
    meta, closed, open_ = summary.get("meta", {}), summary.get("closed"), summary.get("open")
    types = summary.get("per_question_type") or {}
    width = max([9, *map(len, types)])
    setting = f"memory={meta['memory']}" if "memory" in meta else f"K={meta.get('latent_steps', PER_EXAMPLE_K)}"
    split = f", {meta['split']} split" if meta.get("split") else ""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"{summary['benchmark']}{split}, {setting}: {summary['count']} questions"]
    lines.append(f"  {'overall':<{width}} {pct(summary['overall']['accuracy']):>6}, n={summary['count']} "
                 "(exact match, open questions included)")
    if closed:
        floors = [f"majority answer {pct(summary['closed_majority_baseline'])}"]
        if "closed_majority_by_type_baseline" in summary:
            floors.append(f"majority per type {pct(summary['closed_majority_by_type_baseline'])}")
        if "closed_chance" in summary:
            floors.append(f"chance {pct(summary['closed_chance'])}")
        lines.append(f"  {'closed':<{width}} {pct(closed['accuracy']):>6}, n={closed['count']}; "
                     f"floors: {', '.join(floors)} (majorities counted on this split)")
    if open_:
        lines.append(f"  {'open':<{width}} {pct(open_['token_f1']):>6} token F1, n={open_['count']}")
    for qtype, v in types.items():   # closed accuracy and open token F1 apart, as for the whole run
        scores = ([(pct(v["closed_accuracy"]), f"closed, n={v['closed_count']}")] if "closed_accuracy" in v else []) \
            + ([(pct(v["open_token_f1"]), f"token F1 open, n={v['open_count']}")] if "open_token_f1" in v else [])
        text = "; ".join(f"{value:>{6 if i == 0 else 0}} {what}" for i, (value, what) in enumerate(scores))
        lines.append(f"  {qtype:<{width}} {text or 'n=' + str(v['count'])}")
    latency = summary.get("latency_ms")
    if latency:
        lines.append(f"  {'latency':<{width}} {latency['mean']:.1f} ms per question (batch 1, mean over "
                     f"{latency['count']})")
    return "\n".join(lines)


def write_summary(out_dir: str, summaries: Sequence[dict], title: str = "Evaluation") -> str:
    """summary.md: one table row per benchmark run."""
    return write_metrics_markdown(os.path.join(out_dir, SUMMARY_FILE), list(summaries), title=title)


# ------------------------------------------------------------------------------------------------------- K sweep

@dataclasses.dataclass(frozen=True)
class KSweepPoint:
    """The result of one evaluation at K = `latent_steps`.

    `accuracy`: closed-ended accuracy in [0, 1] over `count` closed questions (None when the run has none);
    `latency_ms`: single-example latencies (batch 1, compilation and host-side image / prompt preparation
    excluded; the paper's Figure 4 reports ms per sample without a protocol);
    `open_token_f1`: mean token F1 of the open questions, reported beside accuracy and never mixed into it;
    `batched_ms_per_example` / `batch_size`: batched time per example (throughput), when measured;
    `latency_breakdown_ms`: optional mean latency per phase (e.g. {"prefill", "latent", "decode"}).
    """

    latent_steps: int
    accuracy: float | None
    latency_ms: tuple[float, ...]
    count: int | None = None
    latency_breakdown_ms: Mapping[str, float] | None = None
    open_token_f1: float | None = None
    batched_ms_per_example: tuple[float, ...] | None = None
    batch_size: int | None = None

    def __post_init__(self):
        for name in ("accuracy", "open_token_f1"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"K={self.latent_steps}: {name} must be a fraction in [0, 1], got {value}")
        if self.accuracy is None and self.open_token_f1 is None:
            raise ValueError(f"K={self.latent_steps}: neither a closed accuracy nor an open token F1")
        if not self.latency_ms:
            raise ValueError(f"K={self.latent_steps}: no latency samples")
        object.__setattr__(self, "latency_ms", tuple(float(v) for v in self.latency_ms))
        if self.batched_ms_per_example is not None:
            object.__setattr__(self, "batched_ms_per_example", tuple(float(v) for v in self.batched_ms_per_example))

    @classmethod
    def from_run(cls, latent_steps: int, correct: Sequence[bool], latency_ms: Sequence[float],
                 latency_breakdown_ms: Mapping[str, float] | None = None) -> "KSweepPoint":
        """From per-sample correctness of closed questions and single-example latencies of one run."""
        if not correct:
            raise ValueError(f"K={latent_steps}: no samples")
        return cls(latent_steps, sum(map(bool, correct)) / len(correct), tuple(latency_ms), len(correct),
                   latency_breakdown_ms)

    @classmethod
    def from_scores(cls, latent_steps: int, scored: Mapping, latency_ms: Sequence[float],
                    batched_ms_per_example: Sequence[float] | None = None, batch_size: int | None = None,
                    latency_breakdown_ms: Mapping[str, float] | None = None) -> "KSweepPoint":
        """From `metrics.score`'s output: closed accuracy and open token F1 kept apart."""
        closed = scored.get("closed")
        return cls(latent_steps, closed["accuracy"] if closed else None, tuple(latency_ms),
                   closed["count"] if closed else 0, latency_breakdown_ms, scored.get("open_token_f1"),
                   None if batched_ms_per_example is None else tuple(batched_ms_per_example), batch_size)


def _plotted(points: Sequence[KSweepPoint]) -> tuple[str, list[float]]:
    """(axis label, % values) of what the sweep plots: closed accuracy, or open token F1 when no run has closed
    questions."""
    if all(p.accuracy is not None for p in points):
        return "closed accuracy (%)", [100 * p.accuracy for p in points]
    if all(p.open_token_f1 is not None for p in points):
        return "open token F1 (%)", [100 * p.open_token_f1 for p in points]
    raise ValueError("the sweep's points do not all report the same metric (closed accuracy or open token F1)")


def k_sweep_summary(points: Sequence[KSweepPoint], baselines: Mapping[str, tuple[float, float]] | None = None
                    ) -> dict:
    """JSON-ready sweep: per K closed accuracy (over `closed_count` questions), open token F1, single-example
    latency (batch 1) and batched time per example, and, when K = 0 is present, the accuracy gain (points) and
    latency ratio against it; `baselines` maps a name to (accuracy, mean latency ms)."""
    points = sorted(points, key=lambda p: p.latent_steps)
    ks = [p.latent_steps for p in points]
    if len(set(ks)) != len(ks):
        raise ValueError(f"duplicate K values in the sweep: {ks}")
    direct = next((p for p in points if p.latent_steps == 0), None)
    rows = []
    for p in points:
        row = {"latent_steps": p.latent_steps, "closed_accuracy": p.accuracy, "closed_count": p.count,
               "open_token_f1": p.open_token_f1, "latency_ms": {**latency_summary(p.latency_ms), "batch_size": 1}}
        if p.batched_ms_per_example:
            row["batched_ms_per_example"] = {**latency_summary(p.batched_ms_per_example),
                                             "batch_size": p.batch_size}
        if p.latency_breakdown_ms:
            row["latency_breakdown_ms"] = dict(p.latency_breakdown_ms)
        if direct is not None:
            if p.accuracy is not None and direct.accuracy is not None:
                row["accuracy_gain_vs_k0"] = p.accuracy - direct.accuracy
            row["latency_ratio_vs_k0"] = row["latency_ms"]["mean"] / latency_summary(direct.latency_ms)["mean"]
        rows.append(row)
    out = {"points": rows}
    if baselines:
        out["baselines"] = {name: {"accuracy": float(a), "latency_ms_mean": float(ms)}
                            for name, (a, ms) in baselines.items()}
    return out


def _accuracy_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits (%) around the plotted accuracies, inside [0, 100]: an accuracy axis never shows a negative
    value, as matplotlib's own margins would when every accuracy is 0."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return 0.0, 100.0
    lo, hi = min(finite), max(finite)
    pad = max(5.0, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def k_sweep_figure(points: Sequence[KSweepPoint], baselines: Mapping[str, tuple[float, float]] | None = None,
                   title: str = "") -> Figure:
    """Three panels side by side (the analogue of Figure 4), returned as a matplotlib Figure:
    (a) closed accuracy vs single-example latency, y from 0 to 100 %, one point per K plus the `baselines` (log
    latency axis once the points span more than 5x); (b) latency by K, stacked by phase when every point has the
    same phases; (c) closed accuracy vs K, y zoomed on the data but kept inside 0-100 %. Open token F1 stands in
    for accuracy when no run has closed questions."""
    points = sorted(points, key=lambda p: p.latent_steps)
    ks = [p.latent_steps for p in points]
    metric, accs = _plotted(points)
    means = [float(np.mean(p.latency_ms)) for p in points]
    baselines = dict(baselines or {})
    fig, (ax_a, ax_b, ax_c) = figures.new(1, 3, size=(3 * PANEL_SIZE[0], PANEL_SIZE[1]))
    if title:
        fig.suptitle(title)

    # clip_on=False: a point at 0 % or 100 % shows whole, on the axis line.
    ax_a.plot(means, accs, marker="o", label="latent (K)", clip_on=False)
    for k, ms, acc in zip(ks, means, accs):
        ax_a.annotate(f"K={k}", (ms, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, (acc, ms) in baselines.items():
        ax_a.plot([float(ms)], [100 * float(acc)], marker="s", linestyle="none", label=name, clip_on=False)
        ax_a.annotate(name, (float(ms), 100 * float(acc)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    all_ms = means + [float(ms) for _, ms in baselines.values()]
    # A log latency axis once the points span more than 5x (explicit CoT is ~100x slower in the paper).
    x_log = min(all_ms) > 0 and max(all_ms) / min(all_ms) > 5
    if x_log:
        ax_a.set_xscale("log")
        # Plain numbers at 1, 2 and 5 x 10^n ms; matplotlib's default 2x10^2, 3x10^2, ... labels collide.
        ax_a.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_a.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_a.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax_a.set(xlabel="latency, batch 1 (ms)" + (", log scale" if x_log else ""), ylabel=metric, ylim=(0.0, 100.0),
             title="(a) accuracy vs latency")
    if baselines:
        ax_a.legend(fontsize=8)

    positions = np.arange(len(ks))
    phases = [p.latency_breakdown_ms for p in points]
    if all(phases) and len({tuple(ph) for ph in phases}) == 1:
        bottom = np.zeros(len(ks))
        for name in phases[0]:
            values = np.array([float(ph[name]) for ph in phases])
            ax_b.bar(positions, values, 0.7, bottom=bottom, label=name)
            bottom += values
        ax_b.legend(fontsize=8, loc="upper center", ncol=len(phases[0]))
        ax_b.set_ylim(0.0, 1.25 * float(bottom.max()) if bottom.max() > 0 else 1.0)  # room for the legend
    else:
        bars = ax_b.bar(positions, means, 0.7, label="mean latency")
        ax_b.bar_label(bars, fmt="%.1f", fontsize=8)
        ax_b.margins(y=0.12)  # room for the value labels
    ax_b.set_xticks(positions, [str(k) for k in ks])
    ax_b.set(xlabel="latent steps K", ylabel="latency, batch 1 (ms)", title="(b) latency by K")

    ax_c.plot(ks, accs, marker="o", clip_on=False)
    ax_c.set_xticks(ks)
    ax_c.set(xlabel="latent steps K", ylabel=metric, ylim=_accuracy_limits(accs), title="(c) accuracy vs K")
    for ax in (ax_a, ax_b, ax_c):
        ax.grid(alpha=0.3)
    return fig


def write_k_sweep(out_dir: str, points: Sequence[KSweepPoint],
                  baselines: Mapping[str, tuple[float, float]] | None = None, title: str = "",
                  figure_format: str = "png") -> tuple[str, str]:
    """k_sweep.json (`k_sweep_summary`) and the figure k_sweep.<figure_format> (`k_sweep_figure`; png, pdf or
    svg) under out_dir; returns their paths."""
    if not points:
        raise ValueError("the K sweep needs at least one point")
    figures.check_format(figure_format)
    summary = k_sweep_summary(points, baselines)
    json_path = atomic_write_text(os.path.join(out_dir, K_SWEEP_JSON), json.dumps(summary, indent=2) + "\n")
    figure_path = figures.save(k_sweep_figure(points, baselines, title), os.path.join(out_dir, K_SWEEP_FIGURE),
                               figure_format)
    return json_path, figure_path
