"""Result items: masks and boxes inside the image and on the right patches, the same as the full-size
computation gave; text offsets in characters."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.geometry import ImageGeometry
from attribution.text import Token
from service.label_studio.config import parse_label_config
from service.label_studio.results import heatmap_mask, image_regions, text_region, token_regions
from tests.service.label_studio.scenario import DOCUMENTED
from tests.service.label_studio.test_rle import decode, reference_mask_rle

CONFIG = parse_label_config(DOCUMENTED)


def _image(width: int, height: int, grid: int = 4) -> ImageGeometry:
    """The result's image geometry for a centre crop of the short side, as CLIP's transform does."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return ImageGeometry(
        width, height, (x0, y0, x0 + side, y0 + side), (grid, grid), (side / grid, side / grid)
    )


def test_mask_covers_the_hot_patch_of_the_crop() -> None:
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0  # row 1, col 2
    image = _image(96, 64)  # crop x 16..80, patches 16 px
    mask = heatmap_mask(heat, image, 0.5)
    ys, xs = np.nonzero(mask.pixels())
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (48, 64, 16, 32)
    assert mask.pixels().sum() == 16 * 16
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
    assert np.array_equal(decode(brush["value"]["rle"])[3::4].reshape(64, 96) == 255, mask.pixels())


def test_no_positive_patch_no_region() -> None:
    image = _image(40, 30)
    mask = heatmap_mask(-np.ones((4, 4)), image, 0.5)
    assert not mask.any() and not mask.pixels().any()
    assert image_regions(CONFIG, mask, image) == []


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
    image = ImageGeometry(
        width, height, (dx, dy, dx + side, dy + side), (grid, grid), (side / grid, side / grid)
    )
    heat = np.random.default_rng(seed).normal(size=(grid, grid))
    mask = heatmap_mask(heat, image, level)
    assert mask.pixels().shape == (height, width)
    for region in image_regions(CONFIG, mask, image):
        if region["type"] == "rectanglelabels":
            v = region["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["width"] > 0 and v["height"] > 0
            assert v["x"] + v["width"] <= 100 + 1e-9 and v["y"] + v["height"] <= 100 + 1e-9


def full_size_mask(heatmap: np.ndarray, image: ImageGeometry, level: float) -> np.ndarray:
    """``heatmap_mask`` as it was (commit 764af65): H x W booleans, each pixel the patch of its centre."""
    heat = np.asarray(heatmap, dtype=np.float64)
    width, height = image.width, image.height
    best = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(best) or best <= 0:
        return np.zeros((height, width), dtype=bool)
    cells = heat >= level * best
    rows, cols = heat.shape
    (x0, y0, _, _), (pw, ph) = image.crop_box, image.patch_size
    col = np.floor((np.arange(width) + 0.5 - x0) / pw).astype(np.int64)
    row = np.floor((np.arange(height) + 0.5 - y0) / ph).astype(np.int64)
    col_ok, row_ok = (col >= 0) & (col < cols), (row >= 0) & (row < rows)
    picked = cells[np.clip(row, 0, rows - 1)[:, None], np.clip(col, 0, cols - 1)[None, :]]
    return picked & row_ok[:, None] & col_ok[None, :]


def full_size_regions(mask: np.ndarray, image: ImageGeometry) -> list[dict]:
    """The values ``image_regions`` gave from a full-size mask (commit 764af65): its RLE, its box."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    width, height = image.width, image.height
    box = {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width}
    box |= {"height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": ["Phrase"]}
    return [{"format": "rle", "rle": reference_mask_rle(mask), "brushlabels": ["Phrase"]}, box]


# Crop offsets and patch sizes, some putting patch edges exactly on pixel centres or edges.
offsets = st.one_of(st.floats(-60, 60), st.sampled_from([0.0, 0.5, -0.5, 1.5, 12.0]))
patches = st.one_of(st.floats(0.3, 80), st.sampled_from([1.0, 2.0, 0.5, 16.0, 3.25]))
heats = st.sampled_from(["normal", "all negative", "with nan", "one hot"])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 200),
    st.integers(1, 200),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.tuples(offsets, offsets),
    st.tuples(patches, patches),
    st.one_of(st.floats(1e-300, 1.0), st.just(1.0)),
    heats,
    st.integers(0, 2**32 - 1),
)
def test_regions_are_those_of_the_full_size_mask(width, height, grid, crop, patch, level, kind, seed) -> None:
    """Any image size, grid, crop box (inside the image or past it) and threshold: the same mask, box
    and RLE bytes as the full-size computation, which is never built."""
    rows, cols = grid
    crop_box = (crop[0], crop[1], crop[0] + cols * patch[0], crop[1] + rows * patch[1])
    image = ImageGeometry(width, height, crop_box, grid, patch)
    rng = np.random.default_rng(seed)
    heat = rng.normal(size=grid)
    if kind == "all negative":
        heat = -np.abs(heat)
    elif kind == "with nan":
        heat[rng.integers(rows), rng.integers(cols)] = np.nan
    elif kind == "one hot":
        heat = np.zeros(grid)
        heat[rng.integers(rows), rng.integers(cols)] = 1.0
    full = full_size_mask(heat, image, level)
    mask = heatmap_mask(heat, image, level)
    assert np.array_equal(mask.pixels(), full)
    assert [r["value"] for r in image_regions(CONFIG, mask, image)] == full_size_regions(full, image)


def test_large_images_give_the_full_size_regions() -> None:
    """Megapixel images, the centre crop CLIP's transform takes and a 14 x 14 grid: the same bytes."""
    rng = np.random.default_rng(5)
    for width, height, level in [(3000, 2000, 0.5), (1999, 2999, 1e-300), (2048, 2048, 0.9)]:
        image = _image(width, height, grid=14)
        heat = rng.normal(size=(14, 14))
        full = full_size_mask(heat, image, level)
        regions = image_regions(CONFIG, heatmap_mask(heat, image, level), image)
        assert [r["value"] for r in regions] == full_size_regions(full, image)


def test_text_region_counts_an_emoji_as_one_character() -> None:
    """Label Studio 1.23 counts code points (checked in the browser by test_label_studio_e2e.py)."""
    caption = "🐕🐕 a red ball"
    region = text_region(CONFIG, caption, 5, 8)
    assert region["value"] == {"start": 5, "end": 8, "text": "red", "labels": ["Phrase"]}
    assert (region["from_name"], region["to_name"], region["type"]) == ("phrase", "caption", "labels")


def test_token_regions_strongest_first_above_threshold() -> None:
    caption = "🐈 on a mat"
    tokens = [
        Token(0, None, "<start_of_text>", 0, 0),
        Token(1, None, "🐈", 0, 1),
        Token(2, None, "on", 2, 4),
        Token(3, None, "a", 5, 6),
        Token(4, None, "mat", 7, 10),
        Token(5, None, "<end_of_text>", 10, 10),
    ]
    scores = [9.0, 1.0, 0.2, -1.0, 2.0, 5.0]  # start/end tokens are never regions, however high
    regions = token_regions(CONFIG, caption, tokens, scores, min_score=0.4)
    assert [(r["value"]["text"], r["value"]["start"], r["value"]["end"], r["score"]) for r in regions] == [
        ("mat", 7, 10, 1.0),
        ("🐈", 0, 1, 0.5),
    ]
    assert token_regions(CONFIG, caption, tokens, [0.0, -1, -2, -3, -4, 0], min_score=0.0) == []
