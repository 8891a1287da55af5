"""Figures of the learning study (`vital_jax.study`), drawn with matplotlib (`figures`; PNG, or PDF / SVG).

  accuracy_vs_k.png      closed accuracy against K, with and without the curriculum (Table 3), the strongest
                         floor dashed and chance dotted; K = 0 is sft_k0_matched when the study has it (the
                         curriculum rows' number of updates), else sft_k0
  per_type.png           per question type, every Table 2 row, the pause and text-only controls and the
                         MedSynapse-V rows (mean, error bar = std), each type's strongest floor dashed
  step_similarity.png    Appendix C.6 (Figure 11): mean cosine similarity of latent steps i, j, for task-only,
                         + L_visual and full VITAL as the paper's three panels, and the pause control (colour scale
                         fixed to -1..1, `figures.similarity_matrix`)
  norm_ratio.png         ||z_k|| / mean token-embedding norm per step (ours, not a paper quantity), task-only vs
                         VITAL vs pause
  learning_curves.png    training loss against step (first seed) of the Table 2 rows
  medsynapse_curves.png  one panel per MedSynapse-V stage (first seed): Stage I's answer NLL, CCR's mean reward,
                         IMT's mean JSD against the stage's step (each its own quantity, so its own axis)
"""

from __future__ import annotations

import os

import numpy as np

from vital_jax.eval import figures

_TYPES = ("yes_no", "location_choice", "identify", "location", "describe", "reasoning")
_TABLE2 = ("backbone", "sft_k0", "text_only", "task_only", "semantic", "visual", "vital", "pause")
_MEDSYNAPSE = ("ms_warmup", "ms_ccr", "ms_imt")


def _stats(runs, get):
    values = np.asarray([v for v in (get(r) for r in runs) if v is not None], np.float64)
    if values.size == 0:
        return np.nan, 0.0
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def accuracy_vs_k(path: str, by_row: dict, floor: dict) -> str | None:
    # K = 0: SFT at the curriculum rows' optimizer steps when the study has it (every other point has that budget).
    k0 = "sft_k0_matched" if "sft_k0_matched" in by_row else "sft_k0"
    curves = {"3-phase curriculum": [k0, "k1", "k2", "k3", "vital"],
              "no curriculum": [k0, "mix_k1", "mix_k2", "mix_k3", "mix_k4"]}
    if not any(r in by_row for rows in curves.values() for r in rows[1:]):
        return None
    fig, (ax,) = figures.new(size=(5.5, 3.8))
    for label, rows in curves.items():
        ks, means, stds = [], [], []
        for k, row in enumerate(rows):
            if row in by_row:
                m, s = _stats(by_row[row], lambda r: r["test"]["closed_accuracy"])
                ks.append(k), means.append(100 * m), stds.append(100 * s)
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.axhline(100 * floor["closed"]["strongest"], ls="--", color="grey", label="strongest floor (no image)")
    ax.axhline(100 * floor["closed"]["chance"], ls=":", color="grey", label="chance")
    k0_steps = by_row[k0][0].get("steps") if k0 in by_row else None
    ax.set(xlabel=f"latent steps K (K = 0: SFT{f', {k0_steps} updates' if k0_steps else ''})",
           ylabel="closed accuracy (%)", title="Closed accuracy against K (test)",
           xticks=range(5), ylim=(0, 100))
    ax.legend(fontsize=8)
    return figures.save(fig, path)


def per_type(path: str, by_row: dict, floor: dict) -> str | None:
    rows = [r for r in _TABLE2 + _MEDSYNAPSE if r in by_row]
    types = [t for t in _TYPES if t in floor]
    if not rows or not types:
        return None
    fig, (ax,) = figures.new(size=(max(6.0, 1.2 * len(types) * len(rows) / 3), 4.0))
    width = 0.8 / len(rows)
    x = np.arange(len(types))
    for i, row in enumerate(rows):
        stats = [_stats(by_row[row], lambda r, t=t: r["test"]["per_type"].get(t, {}).get("score")) for t in types]
        ax.bar(x + i * width - 0.4 + width / 2, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats],
               capsize=2, label=row)
    for j, t in enumerate(types):
        f = floor[t]
        base = (max(f["chance"], f["majority"], f.get("majority_by_options", 0.0)) if "majority" in f
                else f["majority_f1"])
        ax.hlines(100 * base, j - 0.45, j + 0.45, colors="black", linestyles="--",
                  label="strongest floor / most frequent answer" if j == 0 else None)
    ax.set(xticks=x, ylabel="closed accuracy / open token F1 (%)", ylim=(0, 100),
           title="Per question type (test; closed: accuracy, open: token F1)")
    ax.set_xticklabels(types, rotation=15)
    ax.legend(fontsize=7, ncol=2)
    return figures.save(fig, path)


def step_similarity(path: str, by_row: dict) -> str | None:
    rows = [r for r in ("task_only", "visual", "vital", "pause") if r in by_row and by_row[r][0].get("diagnostics")]
    if not rows:
        return None
    fig, axes = figures.new(1, len(rows), size=(3.8 * len(rows), 3.6))
    for ax, row in zip(axes, rows):
        mats = [np.asarray(r["diagnostics"]["step_similarity"], np.float64) for r in by_row[row]
                if r.get("diagnostics")]
        figures.similarity_matrix(fig, ax, np.nanmean(np.stack(mats), axis=0), row)
    fig.suptitle("Latent step similarity S (Appendix C.6)")
    return figures.save(fig, path)


def norm_ratio(path: str, by_row: dict) -> str | None:
    rows = [r for r in ("task_only", "semantic", "visual", "vital", "pause") if r in by_row
            and by_row[r][0].get("diagnostics")]
    if not rows:
        return None
    fig, (ax,) = figures.new(size=(5.0, 3.5))
    for row in rows:
        ratios = np.asarray([r["diagnostics"]["norm_ratio_per_step"] for r in by_row[row] if r.get("diagnostics")])
        ax.plot(range(1, ratios.shape[1] + 1), ratios.mean(0), marker="o", label=row)
    ax.set(xlabel="latent step k", ylabel="||z_k|| / mean token-embedding norm", title="Latent norm ratio (test)")
    ax.legend(fontsize=8)
    return figures.save(fig, path)


def learning_curves(path: str, by_row: dict) -> str | None:
    rows = [r for r in _TABLE2 if r in by_row and by_row[r][0].get("curve") and r != "backbone"]
    if not rows:
        return None
    fig, (ax,) = figures.new(size=(5.5, 3.6))
    for row in rows:
        curve = np.asarray([(s, t if t is not None else loss) for s, loss, t in by_row[row][0]["curve"]], np.float64)
        ax.plot(curve[:, 0], curve[:, 1], label=row)
    ax.set(xlabel="optimizer step", ylabel="task loss (answer CE)", title="Learning curves (first seed)",
           yscale="log")
    ax.legend(fontsize=8)
    return figures.save(fig, path)


# The y-axis of a MedSynapse-V stage's curve, by the metric the study logged for it (study.MEDSYNAPSE_CURVE_METRICS;
# a result without "curve_metric", from an older study, holds its stage's loss).
_MEDSYNAPSE_CURVE_LABELS = {("ms_warmup", "loss"): "Stage I: answer NLL",
                            ("ms_ccr", "reward_mean"): "CCR: mean reward R", ("ms_ccr", "loss"): "CCR: GRPO loss",
                            ("ms_imt", "jsd"): "IMT: mean JSD", ("ms_imt", "loss"): "IMT: loss"}


def medsynapse_curves(path: str, by_row: dict) -> str | None:
    rows = [r for r in _MEDSYNAPSE if r in by_row and by_row[r][0].get("curve")]
    if not rows:
        return None
    fig, axes = figures.new(1, len(rows), size=(3.2 * len(rows) + 0.6, 3.2))
    for ax, row in zip(axes, rows):
        first = by_row[row][0]
        curve = np.asarray([(s, value) for s, value, _ in first["curve"]], np.float64)
        ax.plot(curve[:, 0], curve[:, 1], marker="." if len(curve) < 20 else None)
        label = _MEDSYNAPSE_CURVE_LABELS[(row, first.get("curve_metric", "loss"))]
        ax.set(xlabel="optimizer step (the run's)", ylabel=label, title=f"{row}: {label.split(':')[0]}")
    fig.suptitle("MedSynapse-V stages (first seed)")
    return figures.save(fig, path)


def write_figures(out_dir: str, by_row: dict, floor: dict, figure_format: str = "png") -> dict[str, str]:
    """Every figure that the results allow, as png, pdf or svg; returns name -> path."""
    def path(name: str) -> str:
        return os.path.join(out_dir, f"{name}.{figures.check_format(figure_format)}")

    made = {"accuracy against K": accuracy_vs_k(path("accuracy_vs_k"), by_row, floor),
            "per question type": per_type(path("per_type"), by_row, floor),
            "step similarity": step_similarity(path("step_similarity"), by_row),
            "norm ratio": norm_ratio(path("norm_ratio"), by_row),
            "learning curves": learning_curves(path("learning_curves"), by_row),
            "MedSynapse-V stage curves": medsynapse_curves(path("medsynapse_curves"), by_row)}
    return {k: v for k, v in made.items() if v}
