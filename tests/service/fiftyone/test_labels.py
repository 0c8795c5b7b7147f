"""A phrase's patch grid as FiftyOne geometry: the map in the image's frame, the box and its share."""

from __future__ import annotations

import numpy as np

from attribution.geometry import ImageGeometry
from service.fiftyone.labels import MAP_SIDE, heat_box, image_map


def geometry(width: int, height: int, crop: tuple[float, float, float, float], grid: int) -> ImageGeometry:
    x0, y0, x1, y1 = crop
    return ImageGeometry(width, height, crop, (grid, grid), ((x1 - x0) / grid, (y1 - y0) / grid))


def test_a_crop_of_the_whole_image_keeps_the_grid_as_it_is():
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(image_map(grid, geometry(64, 64, (0, 0, 64, 64), 4)), grid)


def test_a_centre_crop_is_placed_where_the_model_looked_and_zero_elsewhere():
    grid = np.ones((2, 2), dtype=np.float32)
    mapped = image_map(grid, geometry(200, 100, (50, 0, 150, 100), 2))  # the middle square of a wide image
    assert mapped.shape == (MAP_SIDE // 2, MAP_SIDE)
    columns = mapped.any(axis=0)
    assert not columns[: MAP_SIDE // 4 - 1].any() and columns[MAP_SIDE // 4 + 1 : 3 * MAP_SIDE // 4 - 1].all()
    assert not columns[3 * MAP_SIDE // 4 + 1 :].any()


def test_the_box_surrounds_the_strong_patches_and_counts_their_share_of_the_positive_heat():
    grid = np.zeros((4, 4))
    grid[1, 2], grid[2, 2], grid[3, 0], grid[0, 0] = 1.0, 0.6, 0.2, -5.0
    box, share = heat_box(grid, geometry(80, 40, (0, 0, 80, 40), 4))
    assert box == (0.5, 0.25, 0.25, 0.5)  # column 2, rows 1-2, in relative x, y, w, h
    assert np.isclose(share, 1.6 / 1.8)


def test_no_positive_heat_gives_no_box():
    assert heat_box(-np.ones((3, 3)), geometry(30, 30, (0, 0, 30, 30), 3)) == (None, None)


def test_a_box_in_padding_is_clipped_to_the_image():
    grid = np.zeros((2, 2))
    grid[0, 1] = 1.0  # the right half of a crop reaching 20 px past a 100 px wide image
    box, _ = heat_box(grid, geometry(100, 120, (-20, 0, 120, 120), 2))
    assert box is not None and np.isclose(box[0] + box[2], 1.0) and np.isclose(box[0], 0.5)
