"""The page's example scenes with the demo model: one click gives the heatmap of a phrase, on its object.

A second embedded service serves the shipped ``exclip-scenes`` (named explicitly), in real Chromium. The
committed example files must be what scripts/make_examples.py generates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.make_examples import EXAMPLES_DIR, example_entries, pick_examples
from tests.web.test_page import LAPTOP, open_page


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

    # The heatmap the page draws: the selected tokens' rows summed, per patch (8x8 patches of 8 pixels).
    heat = np.asarray(page.evaluate("Array.from(spanHeatmap(state.captions[0], state.selection))"))
    phrase = next(p for p in example["phrases"] if p["text"] == example["highlight"])
    row, col = divmod(int(heat.argmax()), 8)
    x0, y0, x1, y1 = phrase["box"]
    assert col * 8 < x1 and (col + 1) * 8 > x0 and row * 8 < y1 and (row + 1) * 8 > y0, (row, col, phrase)
    drawn = page.evaluate(
        """() => { const c = document.getElementById('overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    )
    assert drawn > 0
    assert page.js_errors == []
    page.close()


def test_no_demo_note_for_a_real_model(browser, service_url):
    page = open_page(browser, service_url, LAPTOP)  # the tiny test model, not a demo
    assert page.is_hidden("#demo-note")
    assert page.locator("#examples .example").count() > 0  # the examples are offered anyway
    page.close()
