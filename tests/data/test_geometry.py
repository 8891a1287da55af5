"""`geometry.measure`'s shape and intensity figures on masks whose values follow from their construction."""

import numpy as np
import pytest

from vital_jax.data import geometry


def test_convex_hull_area_of_pixel_corners_and_degenerate_point_sets():
    square = np.array([(r, c) for r in range(4) for c in range(4)])  # 16 points, duplicates added below
    assert geometry._convex_hull_area(np.concatenate([square, square[:5]])) == 9.0
    # An L: the 10 x 10 square less its 5 x 5 corner; the hull cuts the notch with one diagonal.
    corners = np.array([(0, 0), (0, 10), (5, 10), (5, 5), (10, 5), (10, 0), (3, 3)])
    assert geometry._convex_hull_area(corners) == 100.0 - 12.5
    assert geometry._convex_hull_area(np.array([(0, 0), (1, 1), (2, 2), (5, 5)])) == 0.0  # collinear
    assert geometry._convex_hull_area(np.array([(0, 0), (0, 3)])) == 0.0
    assert geometry._convex_hull_area(np.zeros((0, 2))) == 0.0


def test_solidity_ring_and_intensities_of_a_known_mask():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[0:10, 0:10] = True       # an L at the image's corner (the ring is clipped there)
    mask[5:10, 5:10] = False
    g = geometry.measure(image, mask)
    # Hull of the pixels' corners: the L's outline with the notch cut by one diagonal (87.5 square pixels).
    assert g.solidity == pytest.approx(75 / 87.5) and g.components == 1
    gray = image.astype(np.float64).mean(axis=-1)
    radius = max(2, round(0.03 * 50))
    grown = np.zeros_like(mask)
    for r, c in zip(*np.nonzero(mask)):
        grown[max(0, r - radius):r + radius + 1, max(0, c - radius):c + radius + 1] = True
    assert g.inside_mean == pytest.approx(gray[mask].mean()) and g.inside_std == pytest.approx(gray[mask].std())
    assert g.surround_mean == pytest.approx(gray[grown & ~mask].mean())
    # A gray image gives the same figures as its RGB copy; a mask that fills the image has no ring (its own mean).
    assert geometry.measure(image[..., 0], mask).inside_mean == pytest.approx(image[..., 0][mask].mean())
    full = geometry.measure(image, np.ones((40, 50), bool))
    assert full.surround_mean == full.inside_mean and full.solidity == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        geometry.measure(image[:-1], mask)
