"""Result items: masks and boxes inside the image and on the right patches; text offsets in characters."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.label_studio.config import parse_label_config
from service.label_studio.results import heatmap_mask, image_regions, text_region, token_regions
from tests.label_studio.scenario import DOCUMENTED
from tests.label_studio.test_rle import decode

CONFIG = parse_label_config(DOCUMENTED)


def _image(width: int, height: int, grid: int = 4) -> dict:
    """The result's image object for a centre crop of the short side, as CLIP's transform does."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return {
        "width": width,
        "height": height,
        "crop_box": [x0, y0, x0 + side, y0 + side],
        "patch_size": [side / grid, side / grid],
    }


def test_mask_covers_the_hot_patch_of_the_crop() -> None:
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0  # row 1, col 2
    image = _image(96, 64)  # crop x 16..80, patches 16 px
    mask = heatmap_mask(heat, image, 0.5)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (48, 64, 16, 32)
    assert mask.sum() == 16 * 16
    (brush, rect) = image_regions(CONFIG, mask, image)
    assert rect["value"] == {
        "x": 50.0,
        "y": 25.0,
        "width": 100 * 16 / 96,
        "height": 25.0,
        "rotation": 0,
        "rectanglelabels": ["Phrase"],
    }
    assert (rect["from_name"], rect["to_name"], rect["type"]) == ("region", "image", "rectanglelabels")
    assert (rect["original_width"], rect["original_height"], rect["image_rotation"]) == (96, 64, 0)
    assert brush["value"]["brushlabels"] == ["Phrase"] and brush["value"]["format"] == "rle"
    assert np.array_equal(decode(brush["value"]["rle"])[3::4].reshape(64, 96) == 255, mask)


def test_no_positive_patch_no_region() -> None:
    image = _image(40, 30)
    assert not heatmap_mask(-np.ones((4, 4)), image, 0.5).any()
    assert image_regions(CONFIG, np.zeros((30, 40), bool), image) == []


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 120),
    st.integers(1, 120),
    st.integers(1, 7),
    st.floats(-30, 30),
    st.floats(-30, 30),
    st.floats(0.05, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_regions_stay_inside_the_image(width, height, grid, dx, dy, level, seed) -> None:
    """Whatever the crop (it may reach past the image where the transform pads), boxes stay in 0..100 %."""
    side = max(width, height) * 1.1
    image = {
        "width": width,
        "height": height,
        "crop_box": [dx, dy, dx + side, dy + side],
        "patch_size": [side / grid, side / grid],
    }
    heat = np.random.default_rng(seed).normal(size=(grid, grid))
    mask = heatmap_mask(heat, image, level)
    assert mask.shape == (height, width)
    for region in image_regions(CONFIG, mask, image):
        if region["type"] == "rectanglelabels":
            v = region["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["width"] > 0 and v["height"] > 0
            assert v["x"] + v["width"] <= 100 + 1e-9 and v["y"] + v["height"] <= 100 + 1e-9


def test_text_region_counts_an_emoji_as_one_character() -> None:
    """Label Studio 1.23 counts code points (checked in the browser by test_label_studio_e2e.py)."""
    caption = "🐕🐕 a red ball"
    region = text_region(CONFIG, caption, 5, 8)
    assert region["value"] == {"start": 5, "end": 8, "text": "red", "labels": ["Phrase"]}
    assert (region["from_name"], region["to_name"], region["type"]) == ("phrase", "caption", "labels")


def test_token_regions_strongest_first_above_threshold() -> None:
    caption = "🐈 on a mat"
    tokens = [
        {"index": 0, "text": "<start_of_text>", "start": 0, "end": 0},
        {"index": 1, "text": "🐈", "start": 0, "end": 1},
        {"index": 2, "text": "on", "start": 2, "end": 4},
        {"index": 3, "text": "a", "start": 5, "end": 6},
        {"index": 4, "text": "mat", "start": 7, "end": 10},
        {"index": 5, "text": "<end_of_text>", "start": 10, "end": 10},
    ]
    scores = [9.0, 1.0, 0.2, -1.0, 2.0, 5.0]  # start/end tokens are never regions, however high
    regions = token_regions(CONFIG, caption, tokens, scores, min_score=0.4)
    assert [(r["value"]["text"], r["value"]["start"], r["value"]["end"], r["score"]) for r in regions] == [
        ("mat", 7, 10, 1.0),
        ("🐈", 0, 1, 0.5),
    ]
    assert token_regions(CONFIG, caption, tokens, [0.0, -1, -2, -3, -4, 0], min_score=0.0) == []
