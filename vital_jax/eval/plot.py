"""Minimal charts drawn with PIL (no matplotlib): line and bar charts with axes, ticks, labels and a legend,
panels side by side, and a heatmap overlay with small built-in colour maps (viridis, jet).

    image = line_chart([Series("accuracy", ks, accs)], x_label="K", y_label="accuracy (%)", title="(a)")
    save_png(hstack([image, bar_chart(...)]), "k_sweep.png")
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
MARGIN = {"left": 64, "right": 20, "top": 36, "bottom": 52}

# Anchor colours sampled evenly from each map; values in between are linearly interpolated.
COLORMAPS = {
    "viridis": ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
                (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)),
    "jet": ((0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0),
            (255, 128, 0), (255, 0, 0), (128, 0, 0)),
}


@dataclasses.dataclass(frozen=True)
class Series:
    """One named line (or bar group) of a chart; `color` None takes the next palette colour."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int] | None = None


def font(size: int = 12) -> ImageFont.ImageFont:
    """PIL's built-in font at `size` (a scalable one on Pillow >= 10.1, the fixed bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got ({lo}, {hi})")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        lo, hi = lo - 0.5 if lo == 0 else lo - abs(lo) * 0.1, hi + 0.5 if hi == 0 else hi + abs(hi) * 0.1
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, value = [], start
    while value < hi + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(value, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis covering [lo, hi] (lo > 0): powers of ten, with 2x and 5x added when the range
    spans fewer than two decades."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"a log axis needs a positive finite range, got ({lo}, {hi})")
    lo, hi = min(lo, hi), max(lo, hi)
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    last = max(last, first + 1)
    multiples = (1, 2, 5) if last - first < 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in multiples if m * 10.0 ** e <= 10.0 ** last]
    # Keep one tick on each side of the data and drop the rest outside it.
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    kept = [t for t in ticks if below[-1] <= t <= above[0]]
    return kept if len(kept) > 1 else kept + [ticks[ticks.index(kept[-1]) + 1]]


def _format_tick(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


class _Axes:
    """Maps data coordinates to pixels inside the margins and draws the frame, grid, ticks and labels."""

    def __init__(self, image: Image.Image, x_ticks: Sequence[float], y_ticks: Sequence[float],
                 x_tick_labels: Sequence[str] | None = None, x_log: bool = False):
        self.x_log = x_log
        self.image, self.draw = image, ImageDraw.Draw(image)
        width, height = image.size
        self.x0, self.x1 = MARGIN["left"], width - MARGIN["right"]
        self.y0, self.y1 = height - MARGIN["bottom"], MARGIN["top"]
        self.x_ticks, self.y_ticks = list(x_ticks), list(y_ticks)
        self.x_lo, self.x_hi = min(self.x_ticks), max(self.x_ticks)
        self.y_lo, self.y_hi = min(self.y_ticks), max(self.y_ticks)
        self.x_tick_labels = x_tick_labels

    def px(self, x: float, y: float) -> tuple[float, float]:
        if self.x_log:
            lo, hi = math.log10(self.x_lo), math.log10(self.x_hi)
            fx = 0.5 if hi == lo else (math.log10(x) - lo) / (hi - lo)
        else:
            fx = 0.5 if self.x_hi == self.x_lo else (x - self.x_lo) / (self.x_hi - self.x_lo)
        fy = 0.5 if self.y_hi == self.y_lo else (y - self.y_lo) / (self.y_hi - self.y_lo)
        return self.x0 + fx * (self.x1 - self.x0), self.y0 - fy * (self.y0 - self.y1)

    def frame(self, x_label: str, y_label: str, title: str) -> None:
        draw, small, big = self.draw, font(11), font(13)
        for y in self.y_ticks:
            _, py = self.px(self.x_lo, y)
            draw.line([(self.x0, py), (self.x1, py)], fill=GRID)
            label = _format_tick(y)
            w, h = _text_size(draw, label, small)
            draw.line([(self.x0 - 4, py), (self.x0, py)], fill=INK)
            draw.text((self.x0 - 7 - w, py - h / 2 - 1), label, fill=INK, font=small)
        for i, x in enumerate(self.x_ticks):
            px, _ = self.px(x, self.y_lo)
            label = self.x_tick_labels[i] if self.x_tick_labels is not None else _format_tick(x)
            if not label:
                continue
            w, _ = _text_size(draw, label, small)
            draw.line([(px, self.y0), (px, self.y0 + 4)], fill=INK)
            draw.text((px - w / 2, self.y0 + 7), label, fill=INK, font=small)
        draw.rectangle([self.x0, self.y1, self.x1, self.y0], outline=INK)
        w, h = _text_size(draw, x_label, big)
        draw.text(((self.x0 + self.x1) / 2 - w / 2, self.image.height - h - 10), x_label, fill=INK, font=big)
        w, h = _text_size(draw, title, big)
        draw.text(((self.x0 + self.x1) / 2 - w / 2, 10), title, fill=INK, font=big)
        if y_label:
            w, h = _text_size(draw, y_label, big)
            strip = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
            ImageDraw.Draw(strip).text((2, 1), y_label, fill=INK, font=big)
            strip = strip.rotate(90, expand=True)
            self.image.paste(strip, (6, int((self.y0 + self.y1) / 2 - strip.height / 2)))

    def legend(self, names: Sequence[str], colors: Sequence[tuple[int, int, int]], where: str = "right") -> None:
        """A boxed legend in the upper right (or upper left) corner."""
        draw, small = self.draw, font(11)
        widths = [_text_size(draw, n, small)[0] for n in names]
        box_w, row_h = max(widths, default=0) + 30, 16
        left = self.x1 - box_w - 6 if where == "right" else self.x0 + 6
        top = self.y1 + 6
        draw.rectangle([left, top, left + box_w, top + row_h * len(names) + 4], fill=BACKGROUND, outline=GRID)
        for i, (name, color) in enumerate(zip(names, colors)):
            y = top + 4 + i * row_h
            draw.rectangle([left + 5, y + 3, left + 17, y + 11], fill=color)
            draw.text((left + 22, y), name, fill=INK, font=small)


def _colors(series: Sequence[Series]) -> list[tuple[int, int, int]]:
    return [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]


def _y_ticks(values: Sequence[float], y_range: tuple[float, float] | None, include_zero: bool,
             headroom: float = 0.0) -> list[float]:
    if y_range is not None:
        return nice_ticks(*y_range)
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    lo = min(lo, 0.0) if include_zero else lo
    return nice_ticks(lo, hi + headroom * (hi - lo))


def line_chart(series: Sequence[Series], *, x_label: str = "", y_label: str = "", title: str = "",
               size: tuple[int, int] = (480, 360), y_range: tuple[float, float] | None = None,
               x_ticks: Sequence[float] | None = None, point_labels: Sequence[Sequence[str]] | None = None,
               legend: bool = True, x_log: bool = False) -> Image.Image:
    """Lines with round markers, one per series, on shared axes; `point_labels[i][j]` annotates point j of
    series i. Non-finite y values are skipped (the line breaks there). `x_log` draws x on a log10 scale (x > 0)."""
    if not series:
        raise ValueError("line_chart needs at least one series")
    for s in series:
        if len(s.x) != len(s.y):
            raise ValueError(f"series {s.name!r}: {len(s.x)} x values but {len(s.y)} y values")
    image = Image.new("RGB", size, BACKGROUND)
    xs = [float(x) for s in series for x in s.x]
    if x_ticks is None:
        x_ticks = log_ticks(min(xs), max(xs)) if x_log else nice_ticks(min(xs), max(xs))
    axes = _Axes(image, x_ticks, _y_ticks([y for s in series for y in s.y], y_range, include_zero=False),
                 x_log=x_log)
    axes.frame(x_label, y_label, title)
    colors = _colors(series)
    for i, (s, color) in enumerate(zip(series, colors)):
        points = [axes.px(x, y) if y is not None and math.isfinite(y) else None for x, y in zip(s.x, s.y)]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                axes.draw.line([a, b], fill=color, width=2)
        for j, p in enumerate(points):
            if p is None:
                continue
            axes.draw.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=color, outline=INK)
            if point_labels is not None:
                axes.draw.text((p[0] + 6, p[1] - 15), point_labels[i][j], fill=INK, font=font(11))
    if legend:
        axes.legend([s.name for s in series], colors)
    return image


def bar_chart(labels: Sequence[str], series: Sequence[Series], *, x_label: str = "", y_label: str = "",
              title: str = "", size: tuple[int, int] = (480, 360), y_range: tuple[float, float] | None = None,
              stacked: bool = False, legend: bool = True, value_labels: bool = False) -> Image.Image:
    """Bars for categories `labels`: one bar per series side by side (or stacked). Each series' `y` holds one
    value per label (its `x` is ignored)."""
    if not series:
        raise ValueError("bar_chart needs at least one series")
    for s in series:
        if len(s.y) != len(labels):
            raise ValueError(f"series {s.name!r}: {len(s.y)} values for {len(labels)} labels")
    totals = [sum(s.y[i] for s in series) for i in range(len(labels))] if stacked else [
        v for s in series for v in s.y]
    image = Image.new("RGB", size, BACKGROUND)
    n = len(labels)
    # Headroom above the tallest bar for value labels and the legend.
    axes = _Axes(image, [-0.5, n - 0.5], _y_ticks(totals, y_range, include_zero=True, headroom=0.25),
                 x_tick_labels=["", ""])
    axes.frame(x_label, y_label, title)
    colors = _colors(series)
    small = font(11)
    group = 0.8
    width = group if stacked else group / len(series)
    for i, label in enumerate(labels):
        px, _ = axes.px(i, 0)
        w, _ = _text_size(axes.draw, label, small)
        axes.draw.line([(px, axes.y0), (px, axes.y0 + 4)], fill=INK)
        axes.draw.text((px - w / 2, axes.y0 + 7), label, fill=INK, font=small)
        base = 0.0
        for j, (s, color) in enumerate(zip(series, colors)):
            left = i - group / 2 + (0 if stacked else j * width)
            bottom, top = (base, base + s.y[i]) if stacked else (0.0, s.y[i])
            (xa, ya), (xb, yb) = axes.px(left, top), axes.px(left + width, bottom)
            axes.draw.rectangle([xa + 1, min(ya, yb), xb - 1, max(ya, yb)], fill=color, outline=INK)
            if value_labels:
                text = _format_tick(round(s.y[i], 1))
                tw, th = _text_size(axes.draw, text, small)
                axes.draw.text(((xa + xb) / 2 - tw / 2, min(ya, yb) - th - 4), text, fill=INK, font=small)
            base = top
    if legend and len(series) > 1:
        axes.legend([s.name for s in series], colors, where="left")
    return image


def hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Panels side by side on a white background, top-aligned."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return out


def apply_colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """uint8 RGB (..., 3) for values in [0, 1] (clipped; NaN -> 0) through colour map `name`."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colour map {name!r} (expected one of {', '.join(COLORMAPS)})")
    table = np.asarray(COLORMAPS[name], np.float32)
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32), nan=0.0), 0.0, 1.0) * (len(table) - 1)
    lo = np.floor(v).astype(np.int32)
    hi = np.minimum(lo + 1, len(table) - 1)
    frac = (v - lo)[..., None]
    return np.round(table[lo] * (1 - frac) + table[hi] * frac).astype(np.uint8)


def overlay_heatmap(image, heatmap: np.ndarray, *, alpha: float = 0.5, colormap: str = "viridis",
                    normalize: bool = True) -> Image.Image:
    """The RGB image with a (g, g) heatmap (e.g. per-patch visual-projector similarities) upsampled bilinearly
    to its size, coloured and alpha-blended on top. `normalize` rescales the heatmap to [0, 1] by its min/max
    (a constant map becomes 0); otherwise values are taken as already in [0, 1]. Returns an RGB image."""
    base = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    base = base.convert("RGB")
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (g, g), got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if normalize:
        lo, hi = float(np.nanmin(heat)), float(np.nanmax(heat))
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    upsampled = np.asarray(Image.fromarray(heat, mode="F").resize(base.size, Image.BILINEAR))
    colored = apply_colormap(upsampled, colormap).astype(np.float32)
    blended = np.asarray(base, np.float32) * (1 - alpha) + colored * alpha
    return Image.fromarray(np.round(blended).astype(np.uint8), "RGB")


def colorbar(height: int, width: int = 16, colormap: str = "viridis") -> Image.Image:
    """A vertical colour bar, high values on top."""
    values = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    return Image.fromarray(apply_colormap(values, colormap), "RGB")


def save_png(image: Image.Image, path: str) -> str:
    """Write a PNG atomically (temporary file in the same directory, then rename); returns the path."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"), binary=True)


def atomic_write(path: str, write, binary: bool = False) -> str:
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename it to `path` (readable 0644)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make outputs unreadable to other users
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
