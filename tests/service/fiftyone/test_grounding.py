"""Pointing and energy of a heatmap against ground-truth boxes (relative x, y, w, h)."""

from __future__ import annotations

import numpy as np

from service.fiftyone.grounding import pointing_and_energy, sample_grounding


def test_the_best_cell_in_the_box_points_and_the_energy_is_the_positive_share_inside():
    heatmap = np.zeros((4, 4))
    heatmap[0, 0], heatmap[3, 3], heatmap[2, 0] = 3.0, 1.0, -10.0
    assert pointing_and_energy(heatmap, [(0.0, 0.0, 0.5, 0.5)]) == (True, 0.75)
    assert pointing_and_energy(heatmap, [(0.5, 0.5, 0.5, 0.5)]) == (False, 0.25)


def test_several_boxes_of_one_label_count_together_and_no_positive_heat_is_zero_energy():
    heatmap = np.ones((2, 2))
    assert pointing_and_energy(heatmap, [(0, 0, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)]) == (True, 0.5)
    assert pointing_and_energy(-np.ones((2, 2)), [(0, 0, 1, 1)])[1] == 0.0


def test_only_phrases_with_boxes_of_their_label_are_scored():
    heatmap = np.eye(2)
    truth = [("red circle", (0.0, 0.0, 0.5, 0.5))]
    scored = sample_grounding([heatmap, heatmap, None], ["red circle", "blue square", "red circle"], truth)
    assert scored == [(True, 0.5)]
