"""The PNG renderer: colormap, bilinear upsampling, overlay placement, legend."""

import numpy as np
import pytest
from PIL import Image

from service.web.render import COLORMAP_STOPS, colormap, render_overlay, symmetric_limit, upsample


def test_colormap_end_points_and_centre():
    rgb = colormap(np.array([-2.0, -1.0, 0.0, 1.0, 5.0]), limit=1.0)
    blue, white, red = (np.array(s[1]) for s in COLORMAP_STOPS)
    assert (rgb[0] == blue).all() and (rgb[1] == blue).all()  # clamped below -limit
    assert (rgb[2] == white).all()
    assert (rgb[3] == red).all() and (rgb[4] == red).all()


def test_colormap_is_monotone_in_redness():
    rgb = colormap(np.linspace(-3, 3, 301), limit=3.0).astype(int)
    redness = rgb[:, 0] - rgb[:, 2]
    assert (np.diff(redness) >= 0).all()
    assert redness[0] < 0 < redness[-1]


def test_symmetric_limit():
    assert symmetric_limit(np.array([[-3.0, 2.0]])) == 3.0
    assert symmetric_limit(np.zeros((2, 2))) == 1.0


def test_upsample_hits_patch_centres_and_respects_crop_box():
    grid = np.arange(6, dtype=float).reshape(2, 3)
    # Crop box 30x20 at (10.5, 5.5) in a 50x30 image: 10x10 patches, centres at x 15.5/25.5/35.5, y 10.5/20.5.
    values, inside = upsample(grid, (10.5, 5.5, 40.5, 25.5), 50, 30)
    assert values.shape == (30, 50) and inside.shape == (30, 50)
    assert values[10, 15] == pytest.approx(0.0)  # pixel centre (15.5, 10.5) = patch (0, 0) centre
    assert values[20, 35] == pytest.approx(5.0)  # patch (1, 2) centre
    assert values[10, 20] == pytest.approx(0.5)  # halfway between patches (0, 0) and (0, 1)
    assert values[15, 20] == pytest.approx(2.0)  # centre of patches (0,0),(0,1),(1,0),(1,1): mean 2
    assert values[6, 11] == pytest.approx(0.0)  # clamped at the border
    assert values[24, 39] == pytest.approx(5.0)
    assert inside[5, 10] and inside[24, 39] and not inside[4, 10] and not inside[25, 39] and not inside[5, 40]
    assert values[2, 2] == 0.0 and not inside[2, 2]


def test_overlay_keeps_size_and_mode_and_puts_heat_at_maximum():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    heat = np.zeros((4, 4))
    heat[2, 3] = 5.0
    heat[0, 0] = -2.0
    crop = (8, 0, 56, 48)  # 48x48 centre crop: 12x12 patches
    out = render_overlay(image, heat, crop, alpha=0.7)
    assert out.size == (64, 48) and out.mode == "RGB"
    px = np.asarray(out).astype(int)
    redness = px[..., 0] - px[..., 2]
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert 8 + 3 * 12 <= x < 8 + 4 * 12 and 2 * 12 <= y < 3 * 12
    y, x = np.unravel_index(np.argmin(redness), redness.shape)
    assert 8 <= x < 20 and 0 <= y < 12
    # Outside the crop box the image is untouched.
    assert (px[:, :8] == 128).all() and (px[:, 56:] == 128).all()


def test_alpha_zero_leaves_image_and_alpha_one_shows_pure_colours():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "RGB")
    heat = rng.normal(size=(2, 2))
    assert (np.asarray(render_overlay(image, heat, (0, 0, 20, 20), alpha=0.0)) == np.asarray(image)).all()
    pure = np.asarray(render_overlay(image, heat, (0, 0, 20, 20), alpha=1.0))
    values, _ = upsample(heat, (0, 0, 20, 20), 20, 20)
    assert (pure == colormap(values, symmetric_limit(heat))).all()


def test_box_outline_and_legend_band():
    image = Image.new("RGB", (120, 80), (128, 128, 128))
    heat = np.zeros((2, 2))
    out = render_overlay(image, heat, (20, 0, 100, 80), alpha=0.0, box=(30, 20, 60, 50))
    px = np.asarray(out)
    assert (px[20, 40] == 0).all()  # black outline on the box's top edge
    assert (px[35, 45] == 128).all()  # inside the box untouched
    with_legend = render_overlay(image, heat, (20, 0, 100, 80), legend=True)
    assert with_legend.size[0] == 120 and with_legend.size[1] > 80
    band = np.asarray(with_legend)[80:]
    assert (band.astype(int)[..., 2] - band[..., 0] > 100).any()  # the blue end of the colour bar


def test_large_image_is_rendered_at_max_side_with_the_same_picture():
    """A 6000x3000 image gives a 2048x1024 PNG (default bound), the same as rendering it pre-scaled."""
    from service.web.render import MAX_SIDE

    rng = np.random.default_rng(1)
    heat = rng.normal(size=(4, 4))
    big = Image.new("RGB", (6000, 3000), (100, 150, 200))
    out = render_overlay(big, heat, (1500, 0, 4500, 3000), alpha=1.0)
    assert out.size == (MAX_SIDE, MAX_SIDE // 2)
    small = render_overlay(
        Image.new("RGB", (2048, 1024), (100, 150, 200)), heat, (512, 0, 1536, 1024), alpha=1.0
    )
    assert np.abs(np.asarray(out).astype(int) - np.asarray(small)).max() <= 1
    assert render_overlay(big, heat, (1500, 0, 4500, 3000), max_side=300).size == (300, 150)


def test_legend_of_an_extreme_aspect_ratio_is_bounded():
    """24000x1 used to give a 24000x2001 PNG: now the long side is bounded and so is the band."""
    from service.web.render import LEGEND_MAX_HEIGHT, MAX_SIDE

    out = render_overlay(Image.new("RGB", (24000, 1)), np.ones((2, 2)), (0, 0, 24000, 1), legend=True)
    assert out.size[0] == MAX_SIDE and out.size[1] <= 1 + LEGEND_MAX_HEIGHT


def test_legend_bar_runs_from_blue_to_red_with_labels():
    image = Image.new("RGB", (240, 100), (128, 128, 128))
    heat = np.array([[-2.0, 0.5], [1.0, 0.0]])
    band = np.asarray(render_overlay(image, heat, (0, 0, 240, 100), legend=True))[100:].astype(int)
    margin = max(4, 240 // 40)
    bar_row = band[6]
    blue, white, red = (np.array(s[1]) for s in COLORMAP_STOPS)
    assert (bar_row[margin] == blue).all() and (bar_row[240 - margin - 1] == red).all()
    assert np.abs(bar_row[120] - white).max() <= 8  # the middle of the bar is zero: white
    labels = band[6 + max(6, band.shape[0] // 3) :]
    assert (labels.sum(axis=2) < 200).any()  # dark label text below the bar (-2, 0, 2)
