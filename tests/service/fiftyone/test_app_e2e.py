"""The FiftyOne App shows a sample's phrase heatmap and its box: a headless
Chromium opens the sample in the real App (FiftyOne 1.22.1's server on this session's mongod) and the
screenshot's pixels are checked against the heatmap and box written by ``explain_samples``.

The screenshot is kept in test-artifacts/screenshots/fiftyone.png (and copied to docs/fiftyone.png with
EXCLIP_UPDATE_DOCS_SCREENSHOT=1).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from testing import ROOT, chromium
from testing.fiftyone_env import FiftyOne

pytestmark = pytest.mark.slow

SEED = 7_300_001
SCREENSHOT = ROOT / "test-artifacts" / "screenshots" / "fiftyone.png"
DOCS_SCREENSHOT = ROOT / "docs" / "fiftyone.png"


@pytest.fixture(scope="module")
def shown(fiftyone: FiftyOne, service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One explained two-object scene; the App set to show its first boxed phrase's heatmap and the boxes."""
    images = str(tmp_path_factory.mktemp("app"))
    build = {"name": "app", "directory": images, "n": 1, "seed": SEED, "n_objects": 2}
    explain = {"name": "app", "url": service.url, "caption_field": "caption", "phrases_field": "phrases"}
    _, explained, dumped = fiftyone.run(
        "steps", steps=[["build", build], ["explain", explain], ["dump", {"name": "app"}]]
    )
    assert explained["summary"]["explained"] == 1
    (sample,) = dumped["samples"]
    box = sample["boxes"][0]
    fiftyone.run("show", name="app", paths=[f"exclip_heatmap_{box['phrase_index']}", "exclip_boxes"])
    return {"sample": sample, "box": box}


def screenshot(url: str, sample_id: str) -> tuple[np.ndarray, dict[str, float]]:
    """The page with the sample open, and the box of the App's canvas showing it."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            page.goto(f"{url}/datasets/app?id={sample_id}", timeout=120_000)
            page.get_by_text("exclip_boxes", exact=True).last.wait_for(timeout=120_000)
            shot, previous, canvas = b"", None, None
            for _ in range(60):  # until the sample's canvas is there and drawn (two equal screenshots)
                time.sleep(1)
                canvases = page.locator("canvas")
                boxes = [canvases.nth(i).bounding_box() for i in range(canvases.count())]
                canvas = max((b for b in boxes if b), key=lambda b: b["width"] * b["height"], default=None)
                shot = page.screenshot()
                if canvas is not None and canvas["width"] > 400 and shot == previous:
                    break
                previous = shot
            assert canvas is not None and canvas["width"] > 400, "the App did not show the sample"
        finally:
            page.close()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(shot)
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.float64), canvas


def image_rect(canvas: dict[str, float], width: int, height: int) -> tuple[float, float, float]:
    """Left, top and scale of the image drawn centred and fitted in the canvas."""
    scale = min(canvas["width"] / width, canvas["height"] / height)
    left = canvas["x"] + (canvas["width"] - width * scale) / 2
    top = canvas["y"] + (canvas["height"] - height * scale) / 2
    return left, top, scale


@pytest.fixture(scope="module")
def page(fiftyone: FiftyOne, shown) -> dict[str, Any]:
    with fiftyone.app() as url:
        pixels, canvas = screenshot(url, shown["sample"]["id"])
    source = np.asarray(Image.open(shown["sample"]["filepath"]).convert("RGB")).astype(np.float64)
    return {"pixels": pixels, "canvas": canvas, "source": source}


def test_the_heatmap_is_drawn_over_the_image_warmer_where_the_phrase_scores_higher(shown, page):
    """Viridis, by value (``declare`` sets that): the higher the cell, the redder it turns on screen."""
    grid = np.array(shown["sample"]["heatmaps"][shown["box"]["phrase_index"]]["map"])
    source, pixels = page["source"], page["pixels"]
    height, width = source.shape[:2]
    left, top, scale = image_rect(page["canvas"], width, height)
    rows, cols = grid.shape
    shift = np.zeros(grid.shape)
    for r in range(rows):
        for c in range(cols):
            # the middle half of the cell, on the screen and in the image file
            y0, y1 = (r + 0.25) * height / rows, (r + 0.75) * height / rows
            x0, x1 = (c + 0.25) * width / cols, (c + 0.75) * width / cols
            screen = pixels[
                int(top + y0 * scale) : int(top + y1 * scale), int(left + x0 * scale) : int(left + x1 * scale)
            ]
            original = source[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
            redder = lambda px: float((px[..., 0] - px[..., 2]).mean())  # noqa: E731
            shift[r, c] = redder(screen) - redder(original)
    assert np.corrcoef(shift.ravel(), grid.ravel())[0, 1] > 0.6


def test_the_phrase_box_is_drawn_where_it_was_written(shown, page):
    source, pixels = page["source"], page["pixels"]
    height, width = source.shape[:2]
    left, top, scale = image_rect(page["canvas"], width, height)
    x, y, w, h = shown["box"]["box"]
    x0, x1 = left + (x + 0.2 * w) * width * scale, left + (x + 0.8 * w) * width * scale
    bottom = top + (y + h) * height * scale
    # Some row within 4 px of the box's bottom edge is one flat colour (the box's line) across the middle
    # of the box, unlike the row 10 px above it.
    found = []
    for row in range(int(bottom) - 4, int(bottom) + 5):
        line = pixels[row, int(x0) : int(x1)]
        inside = pixels[row - 10, int(x0) : int(x1)]
        found.append(line.std(axis=0).max() < 12 and np.abs(line - inside).mean() > 25)
    assert any(found)
    assert SCREENSHOT.stat().st_size < 1_000_000
    if os.environ.get("EXCLIP_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)


def test_the_screenshot_file_is_a_png(page):
    assert Path(SCREENSHOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
