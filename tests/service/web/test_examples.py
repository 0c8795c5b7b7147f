"""The page's example scenes with the demo model: one click gives the heatmap of a phrase, on its object.

A second embedded service serves the shipped ``exclip-scenes`` (named explicitly), in real Chromium. The
committed example files must be what scripts/make_examples.py generates. "On its object" is read off the
pixels the page drew: the overlay's colours are mapped back to values through the page's own colormap,
and the strongest region must lie in the object's box from examples.json.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from scripts.make_examples import EXAMPLES_DIR, example_entries, pick_examples
from tests.service.web.test_page import LAPTOP, open_page


@pytest.fixture(scope="module")
def demo_url(session_launcher) -> str:
    proc = session_launcher.embedded(EXCLIP_MODEL="exclip-scenes", EXCLIP_PRETRAINED="scenes")
    return proc.wait_ready().url


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return json.loads((EXAMPLES_DIR / "examples.json").read_text())["examples"]


def test_committed_examples_are_the_generated_ones(examples):
    scenes = pick_examples()
    assert examples == example_entries(scenes)
    from PIL import Image

    for scene, entry in zip(scenes, examples, strict=True):
        with Image.open(EXAMPLES_DIR / entry["file"]) as committed:
            assert np.array_equal(np.asarray(committed.convert("RGB")), np.asarray(scene.image))


def test_one_click_on_an_example_shows_its_phrase_on_its_object(browser, demo_url, examples, screenshots):
    page = open_page(browser, demo_url, LAPTOP)
    assert not page.is_hidden("#demo-note")
    assert "synthetic scenes" in page.text_content("#demo-note")
    buttons = page.locator("#examples .example")
    assert buttons.count() == len(examples)
    example = examples[0]
    assert example["caption"] in buttons.nth(0).text_content()

    buttons.nth(0).click()
    page.wait_for_selector("#result:not([hidden])", timeout=90_000)
    page.wait_for_function("document.getElementById('overlay').dataset.selection !== ''")
    page.screenshot(path=screenshots / "10-example.png", full_page=True)
    assert page.input_value("#model") == "exclip-scenes"
    assert page.input_value("#captions") == example["caption"]
    assert f"“{example['highlight']}”" in page.text_content("#showing")

    # The page draws the phrase's heatmap: the API's interactions summed over exactly the phrase's tokens.
    heat = np.asarray(page.evaluate("Array.from(spanHeatmap(state.captions[0], state.selection))"))
    job = httpx.get(f"{demo_url}/jobs/{page.get_attribute('#result', 'data-job-id')}", timeout=30).json()
    (caption,) = job["result"]["captions"]
    phrase = next(p for p in example["phrases"] if p["text"] == example["highlight"])
    start, end = phrase["start"], phrase["end"]
    tokens = [i for i, t in enumerate(caption["tokens"]) if start <= t["start"] < t["end"] <= end]
    assert [caption["tokens"][i]["text"] for i in tokens] == phrase["text"].split()
    expected = np.asarray(caption["interactions"], dtype=float)[tokens].sum(axis=0).ravel()
    np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-9)
    drawn = page.evaluate(
        """() => { const c = document.getElementById('overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    )
    assert drawn > 0
    assert_strongest_on_box(page, phrase["box"])
    assert page.js_errors == []
    page.close()


# The overlay's pixels back to values in [-1, 1] (of the heatmap's symmetric limit): each opaque pixel
# takes the value whose colour under the page's colormap is nearest; transparent pixels are NaN.
DECODE_OVERLAY = """() => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const n = 2000, table = [];
  for (let k = 0; k <= n; k++) table.push([-1 + 2 * k / n, colormap(-1 + 2 * k / n, 1)]);
  const values = [];
  for (let o = 0; o < d.length; o += 4) {
    if (d[o + 3] === 0) { values.push(null); continue; }
    let best = Infinity, value = 0;
    for (const [t, [r, g, b]] of table) {
      const e = (d[o] - r) ** 2 + (d[o + 1] - g) ** 2 + (d[o + 2] - b) ** 2;
      if (e < best) { best = e; value = t; }
    }
    values.push(value);
  }
  const image = state.captions[state.current].image;
  return {width: c.width, height: c.height, image: [image.width, image.height],
          patch: image.patch_size, values};
}"""

STRONGEST = 0.9  # the strongest region: pixels at 90 % or more of the overlay's largest value
# Measured 2026-12-07 with the shipped model on the four examples, as fractions of the overlay's limit
# (its largest |value|): the largest value 0.49 to 0.99 (one example's strongest value is negative),
# and the mean in the box exceeds the mean outside it by 0.31 to 0.49.
PEAK = 0.3
BOX_CONTRAST = 0.2


def assert_strongest_on_box(page, box: list[int]) -> None:
    """The drawn overlay's strongest region lies on ``box`` (x0, y0, x1, y1 in image pixels, end-exclusive).

    The heatmap has one value per patch, drawn bilinearly between patch centres, so its largest value
    sits at a patch centre: "on the box" means in the box grown by half a patch, i.e. the strongest
    patch overlaps the object (a 10-pixel object can cover a corner of it only).
    """
    drawn = page.evaluate(DECODE_OVERLAY)
    values = np.asarray(drawn["values"], dtype=float).reshape(drawn["height"], drawn["width"])
    assert np.isfinite(values).all()  # the whole image is covered
    peak = values.max()
    assert peak > PEAK, peak  # a positive region to locate (the limit is the largest |value|)
    # Canvas pixel centres in image pixels (the canvas is the image, scaled down only when huge).
    sx, sy = drawn["image"][0] / drawn["width"], drawn["image"][1] / drawn["height"]
    half_w, half_h = drawn["patch"][0] / 2, drawn["patch"][1] / 2
    x0, y0, x1, y1 = box

    def on_box(x: float, y: float) -> bool:
        return x0 - half_w <= x < x1 + half_w and y0 - half_h <= y < y1 + half_h

    top = int(values.argmax())
    px, py = (top % drawn["width"] + 0.5) * sx, (top // drawn["width"] + 0.5) * sy
    assert on_box(px, py), ((px, py), box)
    ys, xs = np.nonzero(values >= STRONGEST * peak)
    centroid = float(((xs + 0.5) * sx).mean()), float(((ys + 0.5) * sy).mean())
    assert on_box(*centroid), (centroid, box)
    # And the box as a whole is where the phrase's heat is, not only its strongest patch.
    inside = np.zeros(values.shape, dtype=bool)
    inside[int(y0 / sy) : int(np.ceil(y1 / sy)), int(x0 / sx) : int(np.ceil(x1 / sx))] = True
    assert values[inside].mean() - values[~inside].mean() > BOX_CONTRAST, box


def test_every_example_shows_its_phrase_on_its_object(browser, demo_url, examples):
    page = open_page(browser, demo_url, LAPTOP)
    buttons = page.locator("#examples .example")
    for k, example in enumerate(examples):
        buttons.nth(k).click()
        page.wait_for_function(
            """caption => state.job && state.job.result.captions[0].caption === caption
                         && document.getElementById('overlay').dataset.selection !== ''""",
            arg=example["caption"],
            timeout=90_000,
        )
        assert f"“{example['highlight']}”" in page.text_content("#showing")
        phrase = next(p for p in example["phrases"] if p["text"] == example["highlight"])
        assert_strongest_on_box(page, phrase["box"])
    assert page.js_errors == []
    page.close()


def test_no_demo_note_for_a_real_model(browser, service_url):
    page = open_page(browser, service_url, LAPTOP)  # the tiny test model, not a demo
    assert page.is_hidden("#demo-note")
    assert page.locator("#examples .example").count() > 0  # the examples are offered anyway
    page.close()
