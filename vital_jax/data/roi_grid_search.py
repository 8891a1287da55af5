"""Grid search over the ROI extraction's area threshold T and crop margin P (paper A.5.3, Figure 9).

Metrics, per (image, mask) pair, on the patch grid of the view the encoder actually saw (the full image or the
square crop canvas), with ROI patches = grid cells that are >= 0.3 mask (and, for crops, valid image content):

  coverage  = (number of ROI patches) / grid_size**2, reported in percent.
  intensity = mean L2 norm of the ROI patches' features (the encoder layer used for f_ROI).
  snr       = intensity / (mean L2 norm of the background patches), background = valid non-ROI patches.

Each metric is averaged over the pairs where it is defined: intensity needs at least one ROI patch (a thin mask
in a crop may have none), snr needs an ROI and a background patch (a mask covering the whole grid has none); the
counts are reported beside the means. The paper describes these metrics in one line each; the definitions above
are this implementation's reading of them. Its absolute intensities (~2,750) are those of MedSigLIP's last
encoder block; random test encoders give other scales.

Cost: the full-image view of a pair does not depend on P, and its crop view does not depend on T, so each pair is
encoded at most 1 + len(paddings) times, whatever the grid size.

CLI: python -m vital_jax.data.roi_grid_search --data_dir=DIR --encoder_dir=DIR --thresholds=0.05,0.1,0.2
       --paddings=0,0.03,0.05,0.1 --num_samples=1000 --out=grid.json [--figure_format=png]
writes grid.json and, beside it, the Figure 9 heatmaps as grid.png (or .pdf / .svg; `grid_figure`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from vital_jax.data import roi
from vital_jax.data.records import RECORDS_FILE, read_records
from vital_jax.eval import figures
from vital_jax.jsonio import atomic_write

PAPER_THRESHOLDS = (0.05, 0.10, 0.20)
PAPER_PADDINGS = (0.0, 0.03, 0.05, 0.10)


def pair_metrics(features: roi.RoiFeatures) -> dict[str, np.ndarray]:
    """Per-pair coverage (fraction, not percent), intensity and snr (N,) float64; NaN where undefined."""
    roi_mask, valid = features.roi_patches, features.valid_patches
    background = valid & ~roi_mask
    norms = features.patch_norms.astype(np.float64)
    num_roi, num_background = roi_mask.sum(1), background.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(num_roi > 0, (norms * roi_mask).sum(1) / num_roi, np.nan)
        background_intensity = np.where(num_background > 0, (norms * background).sum(1) / num_background, np.nan)
        snr = intensity / background_intensity
    return dict(coverage=num_roi / roi_mask.shape[1], intensity=intensity, snr=snr)


def grid_search_pairs(images: Sequence, masks: Sequence, encoder: roi.RoiEncoder, params,
                      thresholds: Sequence[float], paddings: Sequence[float], batch_size: int = 8,
                      names: Sequence[str] | None = None) -> list[dict]:
    """Figure 9 metrics for every (T, P) in thresholds x paddings over the given pairs.

    Returns one dict per (T, P), thresholds-major: threshold, padding, coverage_pct, intensity, snr (means over
    the pairs where defined), num_intensity, num_snr (how many pairs entered those means), full_fraction (share
    of pairs on the full-image pathway) and num_pairs.
    """
    if not thresholds or not paddings:
        raise ValueError("thresholds and paddings must be non-empty")
    names = [f"example {i}" for i in range(len(images))] if names is None else list(names)
    ratios = np.array([roi.load_mask(m, n).mean() for m, n in zip(masks, names)])
    empty = np.flatnonzero(ratios == 0)
    if empty.size:
        raise roi.RoiError(f"{names[empty[0]]}: the mask is empty, so there is no ROI to pool")

    def metrics_for(indices: np.ndarray, cfg: roi.RoiConfig) -> dict[str, np.ndarray]:
        if indices.size == 0:
            return {}
        out = roi.extract_roi_features([images[i] for i in indices], [masks[i] for i in indices], encoder, params,
                                       cfg, [names[i] for i in indices])
        return dict(zip(indices.tolist(), zip(*pair_metrics(out).values())))

    # Pairs that some T sends to the full image, encoded once with the smallest T (all of them go full there).
    full = metrics_for(np.flatnonzero(ratios >= min(thresholds)),
                       roi.RoiConfig(threshold=min(thresholds), batch_size=batch_size))
    results = []
    crops = {}
    for padding in paddings:
        # Pairs that some T sends to the crop pathway, encoded once per P with the largest T (all crop there).
        crops[padding] = metrics_for(np.flatnonzero(ratios < max(thresholds)),
                                     roi.RoiConfig(threshold=max(thresholds), padding=padding, batch_size=batch_size))
    for threshold in thresholds:
        is_full = ratios >= threshold
        for padding in paddings:
            rows = np.array([full[i] if is_full[i] else crops[padding][i] for i in range(len(ratios))])
            coverage, intensity, snr = rows.T
            results.append(dict(
                threshold=float(threshold), padding=float(padding), num_pairs=len(ratios),
                full_fraction=float(is_full.mean()), coverage_pct=float(100 * coverage.mean()),
                intensity=_nanmean(intensity), num_intensity=int(np.isfinite(intensity).sum()),
                snr=_nanmean(snr), num_snr=int(np.isfinite(snr).sum())))
    return results


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def grid_search(data_dir: str, encoder_dir: str, thresholds: Sequence[float] = PAPER_THRESHOLDS,
                paddings: Sequence[float] = PAPER_PADDINGS, num_samples: int | None = 1000, seed: int = 0,
                batch_size: int = 8, feature_layer: str = "last_block") -> dict:
    """Grid search on a record directory: a seeded random subset of `num_samples` distinct (image, mask) pairs
    (all of them when None or when there are fewer). Returns a JSON-ready dict with the settings and `results`
    (see `grid_search_pairs`)."""
    records = read_records(os.path.join(data_dir, RECORDS_FILE))
    pairs, roi_index = roi.unique_pairs(records)
    if not pairs:
        raise roi.RoiError(f"{os.path.join(data_dir, RECORDS_FILE)}: no records")
    first_record = {}
    for record, row in zip(records, roi_index):
        first_record.setdefault(row, record.id)
    chosen = np.arange(len(pairs))
    if num_samples is not None and num_samples < len(pairs):
        chosen = np.sort(np.random.default_rng(seed).choice(len(pairs), num_samples, replace=False))
    encoder, params = roi.load_roi_encoder(encoder_dir, feature_layer)
    results = grid_search_pairs([os.path.join(data_dir, pairs[i][0]) for i in chosen],
                                [os.path.join(data_dir, pairs[i][1]) for i in chosen], encoder, params, thresholds,
                                paddings, batch_size, [f"record {first_record[i]!r}" for i in chosen])
    return dict(data_dir=data_dir, encoder_dir=encoder_dir, feature_layer=feature_layer, seed=seed,
                num_pairs=int(len(chosen)), thresholds=[float(t) for t in thresholds],
                paddings=[float(p) for p in paddings], results=results)


METRICS = (("coverage_pct", "coverage (%)", "{:.1f}"), ("intensity", "intensity (mean ROI patch norm)", "{:.4g}"),
           ("snr", "SNR (ROI / background norm)", "{:.3f}"))


def _metric_grid(report: dict, key: str) -> list[list[float | None]]:
    """One metric as rows T x columns P (None where undefined)."""
    by_setting = {(r["threshold"], r["padding"]): r[key] for r in report["results"]}
    return [[by_setting.get((t, p)) for p in report["paddings"]] for t in report["thresholds"]]


def grid_figure(report: dict):
    """Figure 9 of a `grid_search` report: coverage, intensity and SNR as heatmaps, rows T, columns P, each value
    in its cell ("n/a" where undefined) and a colour bar per metric. Each colour scale runs from that metric's
    lowest to its highest value over the grid (the metrics have different units). Returns the matplotlib
    Figure."""
    rows = [f"T={t:g}" for t in report["thresholds"]]
    cols = [f"P={p:g}" for p in report["paddings"]]
    width = 1.0 + 0.75 * len(cols)
    fig, axes = figures.new(1, len(METRICS), size=(len(METRICS) * (width + 1.2), 0.6 * len(rows) + 1.8))
    for ax, (key, label, fmt) in zip(axes, METRICS):
        image = figures.annotated_matrix(ax, _metric_grid(report, key), row_labels=rows, col_labels=cols, fmt=fmt)
        ax.set(xlabel="crop margin P", ylabel="area threshold T", title=label)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"ROI grid search (Figure 9): {report['num_pairs']} (image, mask) pairs, "
                 f"{report['feature_layer']} features")
    return fig


def format_table(report: dict) -> str:
    """The three Figure 9 heatmaps as text tables (rows T, columns P)."""
    lines = []
    for key, fmt in (("coverage_pct", "{:8.1f}"), ("intensity", "{:8.3f}"), ("snr", "{:8.3f}")):
        lines.append(f"{key:>12} | " + " ".join(f"P={p:<6g}" for p in report["paddings"]))
        for t in report["thresholds"]:
            cells = [r[key] for r in report["results"] if r["threshold"] == t]
            lines.append(f"{'T=' + format(t, 'g'):>12} | " + " ".join(
                "     n/a" if v is None else fmt.format(v) for v in cells))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    from vital_jax import cli
    f = flags.FLAGS
    cli.quiet_libraries()  # JAX's INFO line about absent TPU backends is not the user's business
    cli.tune_host_memory()
    figure_path = f"{os.path.splitext(f.out)[0]}.{f.figure_format}"
    if os.path.abspath(figure_path) == os.path.abspath(f.out):
        cli.usage(f"--out={f.out} would be overwritten by the figure; give the JSON a .json name")
    try:   # bad input (records, images, the encoder directory) is one error line naming it, not a traceback
        report = grid_search(f.data_dir, f.encoder_dir, [float(t) for t in f.thresholds],
                             [float(p) for p in f.paddings], f.num_samples, f.seed, f.batch_size, f.feature_layer)
    except (ValueError, OSError) as e:
        cli.fail(e)
    atomic_write(f.out, lambda out: json.dump(report, out, indent=2))
    figures.save(grid_figure(report), figure_path)
    print(format_table(report))
    print(f"wrote {f.out} and {figure_path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "record directory holding records.jsonl", required=True)
    flags.DEFINE_string("encoder_dir", None, "SigLIP/MedSigLIP directory (HF, or converted by hf_to_flax)",
                        required=True)
    flags.DEFINE_list("thresholds", [str(t) for t in PAPER_THRESHOLDS], "area thresholds T")
    flags.DEFINE_list("paddings", [str(p) for p in PAPER_PADDINGS], "crop margin ratios P")
    flags.DEFINE_integer("num_samples", 1000, "random distinct (image, mask) pairs to evaluate")
    flags.DEFINE_integer("seed", 0, "seed of the subset")
    flags.DEFINE_integer("batch_size", 8, "images per encoder batch")
    flags.DEFINE_enum("feature_layer", "last_block", list(roi.FEATURE_LAYERS), "which SigLIP output to measure")
    flags.DEFINE_string("out", None, "output JSON file (the figure goes beside it)", required=True)
    flags.DEFINE_enum("figure_format", "png", list(figures.FORMATS), "format of the Figure 9 heatmaps")
    from vital_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
