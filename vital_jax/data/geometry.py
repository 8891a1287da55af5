"""Image-space measurements of a target mask: where it is, how big, what shape, how it contrasts with its surround.

Both the question templates (which side to ask about) and the offline geometry teacher (what to answer) read
the target through `measure`. Every location is in IMAGE space (left/right of the picture, upper/lower), never
patient space.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Thirds of the image: centroid coordinate (0..1) -> word.
HORIZONTAL = ("left", "center", "right")
VERTICAL = ("upper", "middle", "lower")
_COMPONENT_GRID = 128          # connected components are counted on a mask downsampled to at most this size
_MIN_COMPONENT_SHARE = 0.05    # components smaller than this share of the mask are specks, not parts


@dataclasses.dataclass(frozen=True)
class MaskGeometry:
    """Measurements of one binary mask over its image. Coordinates are fractions of the image height/width."""

    area_fraction: float
    centroid: tuple[float, float]          # (row, col) in 0..1
    bbox: tuple[float, float, float, float]  # (top, left, bottom, right) in 0..1
    elongation: float                      # sqrt of the ratio of the second-moment eigenvalues, >= 1
    major_axis: str                        # "horizontal", "vertical" or "oblique"
    circularity: float                     # 4 pi A / P^2, 1 for a disc
    solidity: float                        # area / convex-hull area
    components: int
    inside_mean: float                     # mean gray level (0..255) inside the mask
    surround_mean: float                   # mean gray level in a ring around the mask
    inside_std: float

    @property
    def horizontal(self) -> str:
        return HORIZONTAL[min(int(self.centroid[1] * 3), 2)]

    @property
    def vertical(self) -> str:
        return VERTICAL[min(int(self.centroid[0] * 3), 2)]

    @property
    def contrast(self) -> float:
        """Inside minus surround mean gray level (0..255 scale); > 0: the target is brighter than its surround."""
        return self.inside_mean - self.surround_mean


def region_phrase(vertical: str, horizontal: str) -> str:
    """"the upper left part of the image", "the central part of the image", "the left part of the image"..."""
    if vertical == "middle" and horizontal == "center":
        return "the central part of the image"
    if vertical == "middle":
        return f"the {horizontal} part of the image"
    if horizontal == "center":
        return f"the {vertical} central part of the image"
    return f"the {vertical} {horizontal} part of the image"


def box_sum(mask: np.ndarray, radius: int) -> np.ndarray:
    """Sum of `mask` over a (2r+1)^2 window at every pixel (integral image; cost independent of r)."""
    padded = np.pad(mask.astype(np.int64), radius + 1)
    integral = padded.cumsum(0).cumsum(1)
    k = 2 * radius + 1
    h, w = mask.shape
    return (integral[k:k + h, k:k + w] - integral[:h, k:k + w] - integral[k:k + h, :w] + integral[:h, :w])


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain + shoelace)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        hull = []
        for p in seq:
            while len(hull) >= 2:
                (ax, ay), (bx, by) = hull[-2], hull[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                hull.pop()
            hull.append(tuple(p))
        return hull

    lower, upper = half(pts), half(pts[::-1])
    hull = np.asarray(lower[:-1] + upper[:-1], np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _count_components(mask: np.ndarray) -> int:
    """4-connected components holding >= 5% of the mask, on a mask reduced to <= 128 px a side (block any)."""
    factor = max(1, math.ceil(max(mask.shape) / _COMPONENT_GRID))
    h, w = (mask.shape[0] + factor - 1) // factor, (mask.shape[1] + factor - 1) // factor
    padded = np.zeros((h * factor, w * factor), bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    small = padded.reshape(h, factor, w, factor).any(axis=(1, 3))
    # Label propagation: every pixel takes the smallest label among itself and its 4 neighbours until stable.
    big = np.iinfo(np.int64).max
    labels = np.where(small, np.arange(small.size).reshape(small.shape), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nxt = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nxt = np.where(small, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    _, sizes = np.unique(labels[small], return_counts=True)
    return int(np.sum(sizes >= _MIN_COMPONENT_SHARE * small.sum()))


def measure(image: np.ndarray, mask: np.ndarray) -> MaskGeometry:
    """Measure `mask` (bool (H, W), non-empty) over `image` (uint8 (H, W) or (H, W, 3); RGB is averaged)."""
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"measure needs a non-empty 2-D mask, got shape {mask.shape} with {int(mask.sum())} pixels")
    gray = image.astype(np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    if gray.shape != mask.shape:
        raise ValueError(f"image {gray.shape} and mask {mask.shape} differ in size")
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    area = rows.size
    cy, cx = rows.mean(), cols.mean()
    cov = np.cov(np.stack([rows, cols]).astype(np.float64)) if area > 1 else np.zeros((2, 2))
    eigvals, eigvecs = np.linalg.eigh(cov + 1e-9 * np.eye(2))
    elongation = float(math.sqrt(max(eigvals[1], 1e-9) / max(eigvals[0], 1e-9)))
    major = eigvecs[:, 1]  # (row, col) direction of the largest spread
    angle = math.degrees(math.atan2(abs(major[0]), abs(major[1])))
    major_axis = "horizontal" if angle < 30 else "vertical" if angle > 60 else "oblique"
    # Perimeter from 4-neighbour boundary edges; pi/4 converts the city-block length to a Euclidean estimate.
    padded = np.pad(mask, 1)
    edges = sum(int(np.sum(padded[1:-1, 1:-1] & ~np.roll(padded, s, axis=a)[1:-1, 1:-1]))
                for s, a in ((1, 0), (-1, 0), (1, 1), (-1, 1)))
    perimeter = edges * math.pi / 4.0
    circularity = min(1.0, 4.0 * math.pi * area / max(perimeter, 1e-9) ** 2)
    boundary = mask & ~(box_sum(mask, 1) == 9)
    br, bc = np.nonzero(boundary)
    corners = np.concatenate([np.stack([br + dr, bc + dc], 1) for dr in (0, 1) for dc in (0, 1)])
    solidity = min(1.0, area / max(_convex_hull_area(corners), 1.0))
    radius = max(2, int(round(0.03 * max(h, w))))
    ring = (box_sum(mask, radius) > 0) & ~mask
    surround = gray[ring] if ring.any() else gray[mask]
    inside = gray[mask]
    return MaskGeometry(area_fraction=area / (h * w), centroid=(float(cy + 0.5) / h, float(cx + 0.5) / w),
                        bbox=(int(rows.min()) / h, int(cols.min()) / w, (int(rows.max()) + 1) / h,
                              (int(cols.max()) + 1) / w),
                        elongation=elongation, major_axis=major_axis, circularity=circularity, solidity=solidity,
                        components=_count_components(mask), inside_mean=float(inside.mean()),
                        surround_mean=float(surround.mean()), inside_std=float(inside.std()))
