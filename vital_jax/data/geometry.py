"""Image-space measurements of a target mask: where it is, how big, what shape, how it contrasts with its surround.

Both the question templates (which side to ask about) and the offline geometry teacher (what to answer) read
the target through `measure`. Every location is in IMAGE space (left/right of the picture, upper/lower), never
patient space.

One location rule serves every question type. A position along an axis is named by the THIRD of the image that
holds it ("left part", "center", "right part"; "upper", "middle", "lower"); the only half-image words are those of
a yes/no side question, whose answer states its own definition (left or right of the vertical midline), and such
a question is asked only where the half and the third agree (`side_of`). A mask made of several separate parts
(both lungs, scattered glands) is located part by part (`Part`, `where`), never by the centroid of the whole,
which may fall between the parts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

# Thirds of the image: centroid coordinate (0..1) -> word.
HORIZONTAL = ("left", "center", "right")
VERTICAL = ("upper", "middle", "lower")
AXES = {"horizontal": HORIZONTAL, "vertical": VERTICAL}
# A connected component (8-connected) is a part of the target when it holds at least 5% of the mask, or, among
# many similar small pieces (scattered cells), at least a fifth of the largest piece; anything smaller is a speck.
_MIN_PART_SHARE = 0.05
_MIN_PART_OF_LARGEST = 0.2
SCATTERED_PARTS = 4            # from this many parts on, a target is described as scattered, not part by part
_THIRD_COVERED = 0.05          # a third of the image "holds" a scattered target when >= 5% of its area lies there


@dataclasses.dataclass(frozen=True)
class Shape:
    """Shape of one connected region (or of the whole mask)."""

    elongation: float                      # sqrt of the ratio of the second-moment eigenvalues, >= 1
    major_axis: str                        # "horizontal", "vertical" or "oblique"
    circularity: float                     # 4 pi A / P^2, 1 for a disc
    solidity: float                        # area / convex-hull area


@dataclasses.dataclass(frozen=True)
class Part:
    """One separate region of a target (a connected component that is not a speck)."""

    area_fraction: float                   # of the image
    share: float                           # of the whole mask
    centroid: tuple[float, float]          # (row, col) in 0..1
    bbox: tuple[float, float, float, float]
    shape: Shape

    @property
    def horizontal(self) -> str:
        return third(self.centroid[1], "horizontal")

    @property
    def vertical(self) -> str:
        return third(self.centroid[0], "vertical")


@dataclasses.dataclass(frozen=True)
class MaskGeometry:
    """Measurements of one binary mask over its image. Coordinates are fractions of the image height/width."""

    area_fraction: float
    centroid: tuple[float, float]          # (row, col) in 0..1
    bbox: tuple[float, float, float, float]  # (top, left, bottom, right) in 0..1
    elongation: float                      # of the whole mask (see Shape)
    major_axis: str
    circularity: float
    solidity: float
    components: int                        # len(parts)
    inside_mean: float                     # mean gray level (0..255) inside the mask
    surround_mean: float                   # mean gray level in a ring around the mask
    inside_std: float
    parts: tuple[Part, ...] = ()           # largest first
    row_thirds: tuple[float, float, float] = (0.0, 1.0, 0.0)   # share of the mask in the upper/middle/lower third
    col_thirds: tuple[float, float, float] = (0.0, 1.0, 0.0)   # ... in the left/center/right third

    @property
    def horizontal(self) -> str:
        """The third holding the centroid of the whole mask (for a single part: where it is)."""
        return third(self.centroid[1], "horizontal")

    @property
    def vertical(self) -> str:
        return third(self.centroid[0], "vertical")

    @property
    def scattered(self) -> bool:
        return self.components >= SCATTERED_PARTS

    @property
    def contrast(self) -> float:
        """Inside minus surround mean gray level (0..255 scale); > 0: the target is brighter than its surround."""
        return self.inside_mean - self.surround_mean


def third(position: float, axis: str) -> str:
    """The third of the image (word of AXES[axis]) holding `position` (0..1 along that axis)."""
    return AXES[axis][min(int(position * 3), 2)]


def region_core(vertical: str, horizontal: str) -> str:
    """"upper left", "central", "left", "upper central"...: the words before "part of the image"."""
    if vertical == "middle" and horizontal == "center":
        return "central"
    if vertical == "middle":
        return horizontal
    if horizontal == "center":
        return f"{vertical} central"
    return f"{vertical} {horizontal}"


def region_phrase(vertical: str, horizontal: str) -> str:
    """"the upper left part of the image", "the central part of the image", "the left part of the image"..."""
    return f"the {region_core(vertical, horizontal)} part of the image"


def axis_third(g: MaskGeometry, axis: str) -> str | None:
    """The third along `axis` that holds the target, or None when its parts lie in different thirds (a location
    choice along that axis has no single answer)."""
    if g.components <= 1:
        return g.horizontal if axis == "horizontal" else g.vertical
    words = {p.horizontal if axis == "horizontal" else p.vertical for p in g.parts}
    return words.pop() if len(words) == 1 else None


def side_of(g: MaskGeometry, axis: str) -> str | None:
    """The half ("left"/"right", "upper"/"lower") a yes/no side question may ask about, or None. A side is asked
    only when the target lies in an outer third (`axis_third`: the half and the third name the same side) and
    wholly in that half: its bounding box ends at the midline. A centroid in the left third alone was not enough:
    a bar over 0..0.62 of the width has its centroid at 0.31 and a fifth of its pixels right of the midline,
    where "Yes, in the left half" would be false."""
    word = axis_third(g, axis)
    if word in (None, "center", "middle"):
        return None
    top, left, bottom, right = g.bbox
    within = {"left": right <= 0.5, "right": left >= 0.5, "upper": bottom <= 0.5, "lower": top >= 0.5}[word]
    return word if within else None


def straddles(g: MaskGeometry, axis: str) -> bool:
    """Whether the target's parts lie on both sides of the image's midline across `axis`."""
    index = 1 if axis == "horizontal" else 0
    positions = [p.centroid[index] for p in g.parts] if g.components > 1 else [g.centroid[index]]
    return min(positions) < 0.5 <= max(positions)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _span(shares: tuple[float, float, float], words: tuple[str, str, str]) -> str | None:
    """"upper two thirds", "left third", ... of the thirds holding >= 5% of the mask; None for all three."""
    held = [i for i, share in enumerate(shares) if share >= _THIRD_COVERED]
    low, high = min(held), max(held)
    if high - low == 2:
        return None
    if high == low:
        return f"{('central' if words[low] == 'center' else words[low])} third"
    return f"{words[low] if low == 0 else words[high]} two thirds"


def span_phrase(g: MaskGeometry) -> str:
    """The extent of a scattered target: "the whole image", "the upper two thirds of the image", "the lower two
    thirds of the image, within its central third"..."""
    vertical, horizontal = _span(g.row_thirds, VERTICAL), _span(g.col_thirds, HORIZONTAL)
    if vertical and horizontal:
        return f"the {vertical} of the image, within its {horizontal}"
    return f"the {vertical or horizontal} of the image" if vertical or horizontal else "the whole image"


def part_order(g: MaskGeometry) -> list[Part]:
    """The parts left to right when they spread more across than down the image, else top to bottom."""
    rows = [p.centroid[0] for p in g.parts]
    cols = [p.centroid[1] for p in g.parts]
    index = 1 if max(cols) - min(cols) >= max(rows) - min(rows) else 0
    return sorted(g.parts, key=lambda p: p.centroid[index])


def where(g: MaskGeometry) -> str:
    """Where the target is, as a phrase that follows a verb: "in the upper left part of the image", "in the left
    and right parts of the image", "across the upper two thirds of the image" (scattered)."""
    if g.components <= 1:
        return f"in {region_phrase(g.vertical, g.horizontal)}"
    if g.scattered:
        return f"across {span_phrase(g)}"
    cores = list(dict.fromkeys(region_core(p.vertical, p.horizontal) for p in part_order(g)))
    return f"in the {_join(cores)} part{'s' if len(cores) > 1 else ''} of the image"


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points: Qhull finds the hull's vertices (counter-clockwise in 2-D) and the
    shoelace formula sums them, exactly for the integer pixel corners `_shape` passes; 0 for fewer than three
    points or collinear ones (no hull with an area; Qhull would refuse them)."""
    pts = np.asarray(points, np.float64)
    if len(pts) < 3 or np.linalg.matrix_rank(pts - pts[0]) < 2:
        return 0.0
    hull = pts[ConvexHull(pts).vertices]
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape(mask: np.ndarray) -> Shape:
    """Shape of a non-empty bool mask (any size; callers crop to the region)."""
    rows, cols = np.nonzero(mask)
    area = rows.size
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
    boundary = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool))  # beyond the image: not in the mask
    br, bc = np.nonzero(boundary)
    corners = np.concatenate([np.stack([br + dr, bc + dc], 1) for dr in (0, 1) for dc in (0, 1)])
    solidity = min(1.0, area / max(_convex_hull_area(corners), 1.0))
    return Shape(elongation=elongation, major_axis=major_axis, circularity=circularity, solidity=solidity)


def _parts(mask: np.ndarray) -> tuple[Part, ...]:
    """The target's separate regions (8-connected components that are not specks), largest first."""
    h, w = mask.shape
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    floor = min(_MIN_PART_SHARE * sizes.sum(), _MIN_PART_OF_LARGEST * sizes.max())
    parts = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        if sizes[index] < floor:
            continue
        region = labels[box] == index + 1
        rows, cols = np.nonzero(region)
        top, left = box[0].start, box[1].start
        parts.append(Part(area_fraction=float(sizes[index]) / (h * w), share=float(sizes[index] / sizes.sum()),
                          centroid=((top + rows.mean() + 0.5) / h, (left + cols.mean() + 0.5) / w),
                          bbox=(top / h, left / w, box[0].stop / h, box[1].stop / w), shape=_shape(region)))
    return tuple(sorted(parts, key=lambda p: -p.share))


def _thirds(counts: np.ndarray) -> tuple[float, float, float]:
    """Share of `counts` (mask pixels per row or column) in each third of its axis (by pixel centre)."""
    n = counts.size
    index = np.minimum(((np.arange(n) + 0.5) * 3 / n).astype(int), 2)
    total = counts.sum()
    return tuple(float(counts[index == i].sum() / total) for i in range(3))


def _gray(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The gray values (float64; RGB averaged) of `image`'s pixels where `where` is set: only those pixels are
    converted, not the whole image."""
    values = image[where].astype(np.float64)
    return values.mean(axis=-1) if values.ndim == 2 else values


def measure(image: np.ndarray, mask: np.ndarray) -> MaskGeometry:
    """Measure `mask` (bool (H, W), non-empty) over `image` (uint8 (H, W) or (H, W, 3); RGB is averaged)."""
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"measure needs a non-empty 2-D mask, got shape {mask.shape} with {int(mask.sum())} pixels")
    if image.shape[:2] != mask.shape or image.ndim not in (2, 3):
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size (expected an (H, W) or "
                         "(H, W, C) image of the mask's size)")
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    area = rows.size
    shape = _shape(mask)
    parts = _parts(mask)
    radius = max(2, int(round(0.03 * max(h, w))))
    # Pixels within `radius` of the mask (a square window; separable, whatever the radius), less the mask.
    ring = ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant", cval=False) & ~mask
    inside = _gray(image, mask)
    surround = _gray(image, ring) if ring.any() else inside
    return MaskGeometry(area_fraction=area / (h * w), centroid=(float(rows.mean() + 0.5) / h,
                                                                float(cols.mean() + 0.5) / w),
                        bbox=(int(rows.min()) / h, int(cols.min()) / w, (int(rows.max()) + 1) / h,
                              (int(cols.max()) + 1) / w),
                        elongation=shape.elongation, major_axis=shape.major_axis, circularity=shape.circularity,
                        solidity=shape.solidity, components=len(parts), inside_mean=float(inside.mean()),
                        surround_mean=float(surround.mean()), inside_std=float(inside.std()), parts=parts,
                        row_thirds=_thirds(mask.sum(axis=1)), col_thirds=_thirds(mask.sum(axis=0)))
