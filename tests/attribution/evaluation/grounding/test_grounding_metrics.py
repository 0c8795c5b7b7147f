"""Pointing game and energy in box on hand-made heatmaps, against answers computed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.evaluation.grounding.metrics import energy_in_box, pointing_hit, union_cover
from attribution.geometry import ImageGeometry

# 64×64 image seen whole on an 8×8 grid of 8-pixel patches (the scenes model's geometry).
SQUARE = ImageGeometry(width=64, height=64, crop_box=(0, 0, 64, 64), grid=(8, 8), patch_size=(8.0, 8.0))
# A 100×60 image centre-cropped to its middle 60×60, on a 4×4 grid of 15-pixel patches.
CROPPED = ImageGeometry(width=100, height=60, crop_box=(20, 0, 80, 60), grid=(4, 4), patch_size=(15.0, 15.0))


def supersampled_cover(geometry: ImageGeometry, boxes, step: float = 0.25) -> np.ndarray:
    """Per patch, the share of sample points (a fine lattice of cell centres) inside any box and the image."""
    rows, cols = geometry.grid
    pw, ph = geometry.patch_size
    out = np.zeros((rows, cols))
    offsets = np.arange(step / 2, pw, step)
    for r in range(rows):
        for c in range(cols):
            xs = geometry.crop_box[0] + c * pw + offsets
            ys = geometry.crop_box[1] + r * ph + np.arange(step / 2, ph, step)
            gx, gy = np.meshgrid(xs, ys)
            inside = np.zeros_like(gx, dtype=bool)
            for x0, y0, x1, y1 in boxes:
                inside |= (gx >= x0) & (gx < x1) & (gy >= y0) & (gy < y1)
            inside &= (gx >= 0) & (gx < geometry.width) & (gy >= 0) & (gy < geometry.height)
            out[r, c] = inside.mean()
    return out


def one_hot(geometry: ImageGeometry, row: int, col: int, value: float = 1.0) -> torch.Tensor:
    heatmap = torch.zeros(geometry.grid)
    heatmap[row, col] = value
    return heatmap


def test_cover_of_one_box_on_the_square_grid():
    cover = union_cover(SQUARE, [(10, 10, 26, 20)])
    expected = np.zeros((8, 8))
    # x: 10..16 is 6/8 of column 1, 16..24 all of column 2, 24..26 is 2/8 of column 3; y: 10..16, 16..20.
    for col, fx in ((1, 6 / 8), (2, 1.0), (3, 2 / 8)):
        expected[1, col] = fx * 6 / 8
        expected[2, col] = fx * 4 / 8
    np.testing.assert_allclose(cover.numpy(), expected)


def test_overlapping_boxes_count_once_and_outside_of_the_image_is_cut():
    cover = union_cover(SQUARE, [(0, 0, 8, 8), (4, 4, 12, 12), (-50, 60, 4, 200)])
    assert cover[0, 0] == pytest.approx(1.0)  # both boxes cover it; not 1.25
    assert cover[1, 1] == pytest.approx(0.25)
    assert cover[0, 1] == pytest.approx(0.25)
    assert cover[7, 0] == pytest.approx(4 * 4 / 64)  # only y 60..64 and x 0..4 exist


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(*[st.integers(-20, 240)] * 4), min_size=1, max_size=3),
    st.sampled_from([SQUARE, CROPPED]),
)
def test_cover_matches_a_supersampled_mask(raw, geometry):
    boxes = [(min(a, c) / 2, min(b, d) / 2, max(a, c) / 2 + 0.5, max(b, d) / 2 + 0.5) for a, b, c, d in raw]
    expected = supersampled_cover(geometry, boxes)
    np.testing.assert_allclose(union_cover(geometry, boxes).numpy(), expected, atol=1e-9)


def test_pointing_centre_rule_and_overlap_rule():
    box = [(10, 10, 26, 20)]
    # Patch (1, 1) has centre (12, 12): inside. Patch (2, 2) centre (20, 20): y 20 is the box's end, outside.
    assert pointing_hit(one_hot(SQUARE, 1, 1), SQUARE, box, "centre")
    assert pointing_hit(one_hot(SQUARE, 1, 2), SQUARE, box, "centre")
    assert not pointing_hit(one_hot(SQUARE, 2, 2), SQUARE, box, "centre")
    assert pointing_hit(one_hot(SQUARE, 2, 2), SQUARE, box, "overlap")  # it overlaps (y 16..20)
    assert not pointing_hit(one_hot(SQUARE, 0, 0), SQUARE, box, "overlap")
    assert not pointing_hit(one_hot(SQUARE, 1, 4), SQUARE, box, "overlap")


def test_pointing_in_a_cropped_image_uses_original_pixels():
    # Patch (1, 0) of CROPPED covers x 20..35, y 15..30: centre (27.5, 22.5).
    assert pointing_hit(one_hot(CROPPED, 1, 0), CROPPED, [(25, 20, 30, 25)], "centre")
    assert not pointing_hit(one_hot(CROPPED, 1, 0), CROPPED, [(0, 15, 20, 30)], "centre")  # left of the crop
    assert not pointing_hit(one_hot(CROPPED, 1, 0), CROPPED, [(0, 15, 20, 30)], "overlap")


def test_pointing_takes_any_box_and_the_first_of_tied_maxima():
    boxes = [(0, 0, 8, 8), (56, 56, 64, 64)]
    assert pointing_hit(one_hot(SQUARE, 7, 7), SQUARE, boxes)
    tied = torch.ones(8, 8)  # all equal: patch (0, 0) is the one pointed at
    assert pointing_hit(tied, SQUARE, [(0, 0, 8, 8)])
    assert not pointing_hit(tied, SQUARE, [(8, 0, 16, 8)])


def test_energy_counts_positive_mass_by_covered_area():
    heatmap = torch.zeros(8, 8)
    heatmap[0, 0] = 1.0  # wholly inside the box
    heatmap[0, 1] = 3.0  # half inside (x 8..12 of 8..16)
    heatmap[5, 5] = 2.0  # outside
    heatmap[1, 0] = -5.0  # negative: ignored
    box = [(0, 0, 12, 8)]
    assert energy_in_box(heatmap, SQUARE, box) == pytest.approx((1.0 + 1.5) / 6.0)


def test_energy_without_positive_mass_is_zero_and_bounds_hold():
    assert energy_in_box(-torch.ones(8, 8), SQUARE, [(0, 0, 8, 8)]) == 0.0
    assert energy_in_box(torch.ones(8, 8), SQUARE, [(0, 0, 64, 64)]) == pytest.approx(1.0)
    assert energy_in_box(torch.ones(8, 8), SQUARE, [(0, 0, 32, 64)]) == pytest.approx(0.5)


def test_heatmap_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="grid"):
        energy_in_box(torch.ones(4, 4), SQUARE, [(0, 0, 8, 8)])
    with pytest.raises(ValueError, match="rule"):
        pointing_hit(torch.ones(8, 8), SQUARE, [(0, 0, 8, 8)], "nearest")
