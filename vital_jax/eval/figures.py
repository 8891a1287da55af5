"""Figures with matplotlib, shared by every plot the package draws: the K sweep (report), the explanation
heatmaps and step-similarity matrix (explain), the ROI grid search (data.roi_grid_search) and the study's figures.

Figures are `matplotlib.figure.Figure` objects on the Agg canvas, made without pyplot: no GUI backend is needed,
nothing is kept in pyplot's global figure list, and importing this module changes no matplotlib setting of the
caller. `save` takes the format from the file suffix (png, pdf or svg) and replaces the file atomically.

    fig, (ax,) = figures.new(size=(5.0, 3.5))
    ax.plot(ks, accuracy, marker="o")
    figures.save(fig, os.path.join(out_dir, "accuracy"), fmt)   # -> accuracy.png / .pdf / .svg
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from vital_jax.jsonio import atomic_write

FORMATS = ("png", "pdf", "svg")
DPI = 120  # PNG resolution; PDF and SVG are vector formats
SIMILARITY_RANGE = (-1.0, 1.0)  # cosine similarity: the full range, so colours mean the same in every figure


def check_format(fmt: str) -> str:
    """`fmt` lower-cased if it is one of FORMATS; ValueError otherwise."""
    lowered = str(fmt).lower()
    if lowered not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return lowered


def new(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5.0, 3.6), **subplot_kw
        ) -> tuple[Figure, np.ndarray]:
    """A figure of `size` inches with an nrows x ncols grid of axes, returned flat (row-major) in a numpy array.

    Constrained layout keeps titles, tick labels and colour bars inside the figure without manual spacing.
    """
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=subplot_kw or None)
    return fig, axes.ravel()


def save(fig: Figure, path: str, fmt: str | None = None, dpi: int = DPI) -> str:
    """Write `fig` to `path` atomically and return the path written.

    The format is `fmt` when given (its suffix is appended to a `path` without one), else `path`'s suffix; it must
    be one of FORMATS, and a suffix that names another format is an error rather than a mislabelled file.
    """
    suffix = os.path.splitext(path)[1][1:].lower()
    if fmt is None:
        fmt = check_format(suffix)
    else:
        fmt = check_format(fmt)
        if not suffix:
            path = f"{path}.{fmt}"
        elif suffix != fmt:
            raise ValueError(f"{path}: the suffix says {suffix!r} but the requested format is {fmt!r}")
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi), binary=True)


def wrap(text: str, width: int, max_lines: int | None = None) -> str:
    """`text` on lines of at most `width` characters, broken at spaces (a word longer than a line is split);
    with `max_lines`, the last line ends in an ellipsis where text was left out."""
    return textwrap.fill(" ".join(str(text).split()), width, max_lines=max_lines, placeholder=" …",
                         break_on_hyphens=False)


def annotated_matrix(ax: Axes, values, *, row_labels: Sequence[str], col_labels: Sequence[str],
                     vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                     fmt: str = "{:.2f}"):
    """A matrix as coloured cells with each value written in its cell ("n/a" for NaN / None, drawn grey).

    The colour scale runs from vmin to vmax (default: the finite values' range); values outside it take the end
    colours, their text stays exact. Returns the AxesImage, for a colour bar.
    """
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in values], np.float64)
    finite = data[np.isfinite(data)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:  # a constant matrix: any non-empty range shows it in one colour
        vmin, vmax = vmin - 0.5, vmax + 0.5
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colormap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(data.shape[1]), col_labels)
    ax.set_yticks(range(data.shape[0]), row_labels)
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            r, g, b, _ = colormap(image.norm(v))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color=ink)
        else:
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
    return image


def similarity_matrix(fig: Figure, ax: Axes, matrix, title: str = "Latent step similarity") -> None:
    """Appendix C.6 / Figure 11: cos(z_i, z_j) with z1..zK tick labels, values in the cells and a colour bar.

    The colour scale is fixed to the full cosine range SIMILARITY_RANGE (-1 to 1, diverging, white at 0), and the
    title says so, so matrices of different runs and K can be compared by colour.
    """
    matrix = np.asarray(matrix, np.float64)
    labels = [f"z{i + 1}" for i in range(matrix.shape[0])]
    image = annotated_matrix(ax, matrix, row_labels=labels, col_labels=labels, vmin=SIMILARITY_RANGE[0],
                             vmax=SIMILARITY_RANGE[1], cmap="RdBu_r")
    lo, hi = SIMILARITY_RANGE
    ax.set_title(f"{title}\n(cosine, colour scale {lo:g} to {hi:g})", fontsize=10)
    fig.colorbar(image, ax=ax, label="cosine similarity", fraction=0.046)


# ---------------------------------------------------------------------------------------------------------------
# Explanation figures: the latent steps' heatmaps over the image (Figure 3) and their similarity (Figure 11), drawn
# by explain and by the training probe.

HEATMAP_ALPHA = 0.5
CAPTION_WIDTH = 34  # characters per caption line under a 2.6-inch panel


def heatmap_range(maps: np.ndarray) -> tuple[float, float]:
    """The colour scale of an example's heatmaps: lowest to highest cosine over all its K maps, shared by every
    step so colours compare across steps (a constant map gets a small range around its value)."""
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))
    return (lo - 0.01, hi + 0.01) if hi <= lo else (lo, hi)


def _overlay_heatmap(ax, rgb: np.ndarray, heatmap: np.ndarray, value_range: tuple[float, float]):
    """The (g, g) heatmap stretched over the image (bilinear), half transparent; returns its AxesImage."""
    h, w = rgb.shape[:2]
    ax.imshow(rgb)
    image = ax.imshow(heatmap, cmap="viridis", vmin=value_range[0], vmax=value_range[1], alpha=HEATMAP_ALPHA,
                      interpolation="bilinear", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax.set_axis_off()
    return image


def _heatmap_colorbar(fig, image, ax) -> None:
    """A colour bar of the heatmap's scale, drawn opaque (the overlay's transparency would wash it out)."""
    bar = fig.colorbar(ScalarMappable(image.norm, image.cmap), ax=ax, fraction=0.046, shrink=0.85)
    bar.set_label("cosine(VP(z_k), patch)")


def step_figure(rgb: np.ndarray, heatmap: np.ndarray, caption: str,
                value_range: tuple[float, float] | None = None) -> Figure:
    """One step's heatmap (Figure 3): cosine of VP(z_k) to every MedSigLIP patch over the image, with a colour bar
    in cosine units from `value_range` (default: this map's min to max) and the caption wrapped above it."""
    fig, (ax,) = new(size=(3.6, 3.4))
    image = _overlay_heatmap(ax, rgb, heatmap, value_range or heatmap_range(heatmap))
    ax.set_title(wrap(caption, CAPTION_WIDTH, max_lines=3), fontsize=9)
    _heatmap_colorbar(fig, image, ax)
    return fig


def summary_figure(rgb: np.ndarray, maps: np.ndarray, question: str, answer: str, step_texts: list[str],
                   value_range: tuple[float, float] | None = None, mask: np.ndarray | None = None) -> Figure:
    """Figure 3 for one example: the image under its question and answer, then one heatmap per step (K, g, g)
    under the step's decoded text, with one colour bar for all steps (`value_range`, default `heatmap_range`);
    with `mask` (H, W) bool, Figure 12's last panel: the ground-truth region in green over the image."""
    k = len(maps)
    panels = k + 1 + (mask is not None)
    fig, axes = new(1, panels, size=(2.6 * panels + 0.8, 3.4))
    axes[0].imshow(rgb)
    axes[0].set_axis_off()
    axes[0].set_title(wrap(f"Q: {question} A: {answer}", CAPTION_WIDTH, max_lines=4), fontsize=9)
    value_range = value_range or heatmap_range(maps)
    for i, (ax, text) in enumerate(zip(axes[1:], step_texts), start=1):
        image = _overlay_heatmap(ax, rgb, maps[i - 1], value_range)
        ax.set_title(wrap(f"z{i}: {text}", CAPTION_WIDTH, max_lines=4), fontsize=9)
    if mask is not None:
        ax = axes[k + 1]
        ax.imshow(rgb)
        ax.imshow(np.ma.masked_where(~mask, np.ones(mask.shape)), cmap=ListedColormap(["lime"]), alpha=0.35,
                  vmin=0, vmax=1)
        ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_axis_off()
        ax.set_title("ground truth", fontsize=9)
    if k:
        _heatmap_colorbar(fig, image, list(axes[1:k + 1]))
    return fig


def similarity_figure(matrix: np.ndarray, title: str = "Latent step similarity") -> Figure:
    """Figure 11: the (K, K) inter-step cosine similarity, colour scale fixed to -1..1 (`similarity_matrix`)."""
    k = matrix.shape[0]
    fig, (ax,) = new(size=(0.8 * k + 2.4, 0.8 * k + 1.4))
    similarity_matrix(fig, ax, matrix, title)
    return fig
