"""The page in real headless Chromium against a real embedded service (tiny model).

The numbers drawn by the page are compared with the numbers the API returns for the same selection:
overlay canvas pixels against render.py's colormap of the API's span heatmap, token colours against
the colormap of the API's box scores.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.web.render import COLORMAP_STOPS, colormap, symmetric_limit, upsample

CAPTION = "a yellow block on a gradient"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def open_page(browser, url: str, viewport: dict):
    page = browser.new_page(viewport=viewport, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The page is served with a strict Content-Security-Policy: any violation is an error too.
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    page.js_errors = errors
    return page


def explain_on_page(page, image_path, caption: str = CAPTION) -> str:
    page.set_input_files("#image-input", str(image_path))
    page.fill("#captions", caption)
    # Record every progress text shown while the job is queued or running.
    page.evaluate("""() => {
        window.progressSeen = [];
        const text = document.getElementById('progress-text');
        new MutationObserver(() => window.progressSeen.push(text.textContent)).observe(
          document.getElementById('progress'), {subtree: true, childList: true, characterData: true});
      }""")
    page.click("#explain-button")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    return page.get_attribute("#result", "data-job-id")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image_png):
    path = tmp_path_factory.mktemp("web") / "blocks.png"
    path.write_bytes(image_png)
    return path


@pytest.fixture(scope="module")
def page(browser, service_url, image_file, screenshots):
    page = open_page(browser, service_url, LAPTOP)
    page.screenshot(path=screenshots / "01-empty.png", full_page=True)
    page.job_id = explain_on_page(page, image_file)
    page.screenshot(path=screenshots / "02-explained.png", full_page=True)
    yield page
    assert page.js_errors == []
    page.close()


def overlay_pixels(page, points: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(
        page.evaluate(
            """(pts) => { const c = document.getElementById('overlay');
                      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      return pts.map(([x, y]) => {
                        const o = (y * c.width + x) * 4;
                        return Array.from(d.slice(o, o + 4));
                      }); }""",
            points,
        )
    )


def token_box(page, index: int) -> dict:
    return page.locator(f"#token-{index}").bounding_box()


def rgb_of(css: str) -> np.ndarray:
    return np.asarray([int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]])


def test_page_served_without_external_resources(api):
    html = api.get("/").text
    assert "http://" not in html and "https://" not in html
    for asset in ("app.js", "style.css"):
        text = api.get(f"/static/{asset}").text
        assert "http://" not in text and "https://" not in text
    assert api.get("/static/colormap.json").json()["stops"][0][0] == -1.0


def test_js_colormap_is_render_colormap(page):
    values = np.linspace(-1.3, 1.3, 53)
    js = np.asarray(page.evaluate("(vs) => vs.map((v) => colormap(v, 1.1))", values.tolist()))
    assert np.abs(js - colormap(values, 1.1).astype(int)).max() <= 1
    assert page.evaluate("state.stops") == [[t, list(rgb)] for t, rgb in COLORMAP_STOPS]


def test_models_and_steps_come_from_the_api(page, api):
    models = api.get("/models").json()
    names = page.eval_on_selector_all("#model option", "(os) => os.map((o) => o.value)")
    assert names == [m["name"] for m in models["models"]]
    assert page.input_value("#model") == models["default"]
    steps = next(m for m in models["models"] if m["name"] == models["default"])["options"]["steps"]
    assert page.get_attribute("#steps", "min") == str(steps["min"])
    assert page.get_attribute("#steps", "max") == str(steps["max"])


def test_progress_was_shown_while_the_job_ran(page):
    seen = page.evaluate("window.progressSeen")
    assert any(text.startswith(("Queued", "Running")) for text in seen), seen
    assert page.is_hidden("#progress")


def test_drop_an_image(browser, service_url, image_png):
    page = open_page(browser, service_url, LAPTOP)
    page.evaluate(
        """(bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
        const drop = new DragEvent('drop', {dataTransfer: dt, bubbles: true});
        document.getElementById('dropzone').dispatchEvent(drop);
      }""",
        list(image_png),
    )
    page.wait_for_selector("#stage:not([hidden])")
    assert "dropped.png" in page.text_content("#file-name")
    page.close()


def test_score_gap_and_tokens_shown(page, api):
    caption = api.get(f"/jobs/{page.job_id}").json()["result"]["captions"][0]
    assert float(page.text_content("#score")) == pytest.approx(caption["score"], abs=1e-4)
    gap = caption["completeness"]["gap"]
    assert float(page.text_content("#gap")) == pytest.approx(gap, rel=1e-2, abs=1e-6)
    shown_gap = float(page.text_content("#integration-gap"))
    assert shown_gap == pytest.approx(caption["completeness"]["integration_gap"], rel=1e-2, abs=1e-6)
    shown = page.locator("#tokens .token").all_text_contents()
    assert len(shown) == len(caption["tokens"])
    assert shown[1:-1] == [t["text"] for t in caption["tokens"][1:-1]]


def test_dragged_span_overlay_matches_api(page, explain, image_png, screenshots):
    a, b = token_box(page, 2), token_box(page, 3)
    page.mouse.move(a["x"] + 5, a["y"] + 5)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + 5, steps=4)
    page.mouse.up()
    assert page.get_attribute("#overlay", "data-selection") == "2:4"
    assert page.locator("#tokens [aria-selected=true]").count() == 2
    page.screenshot(path=screenshots / "03-span-selected.png", full_page=True)

    api_job = explain(image_png, CAPTION, [{"tokens": [2, 4]}])
    caption = api_job["result"]["captions"][0]
    heat = np.asarray(caption["selections"][0]["heatmap"])
    width, height = caption["image"]["width"], caption["image"]["height"]
    size = page.evaluate("(({width, height}) => [width, height])(document.getElementById('overlay'))")
    assert size == [width, height]
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, width, 300), rng.integers(0, height, 300)
    points = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
    drawn = overlay_pixels(page, points)
    values, inside = upsample(heat, caption["image"]["crop_box"], width, height)
    expected = colormap(values, symmetric_limit(heat)).astype(int)
    for (x, y), px in zip(points, drawn, strict=True):
        if inside[y, x]:
            assert px[3] == 255
            assert np.abs(px[:3] - expected[y, x]).max() <= 2, (x, y, px, expected[y, x])
        else:
            assert px[3] == 0  # no overlay outside the crop box
    assert inside[[y for _, y in points], [x for x, _ in points]].sum() > 100
    limit = float(page.get_attribute("#overlay-legend", "data-limit"))
    assert limit == pytest.approx(symmetric_limit(heat), rel=1e-4)
    assert float(page.text_content("#overlay-legend .hi")) == pytest.approx(limit, rel=5e-3)


def test_keyboard_selection(page):
    page.focus("#token-1")
    page.keyboard.press("Enter")
    assert page.get_attribute("#overlay", "data-selection") == "1:2"
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowRight")
    assert page.get_attribute("#overlay", "data-selection") == "1:4"
    page.keyboard.press("ArrowRight")  # moves focus only
    assert page.evaluate("document.activeElement.id") == "token-4"
    page.keyboard.press(" ")
    assert page.get_attribute("#overlay", "data-selection") == "4:5"
    page.keyboard.press("Escape")
    assert page.get_attribute("#overlay", "data-selection") == ""
    assert page.locator("#tokens [aria-selected=true]").count() == 0


def test_drawn_box_colours_tokens_like_api(page, explain, image_png, screenshots):
    stage = page.locator("#stage").bounding_box()
    page.mouse.move(stage["x"] + stage["width"] * 0.30, stage["y"] + stage["height"] * 0.20)
    page.mouse.down()
    page.mouse.move(stage["x"] + stage["width"] * 0.55, stage["y"] + stage["height"] * 0.60, steps=5)
    page.mouse.up()
    box = page.evaluate("state.box")
    assert box is not None and box[0] < box[2] and box[1] < box[3]
    assert page.is_visible("#box-rect") and page.is_visible("#token-legend")
    page.screenshot(path=screenshots / "04-box-drawn.png", full_page=True)

    scores = np.asarray(
        explain(image_png, CAPTION, [{"box": box}])["result"]["captions"][0]["selections"][0]["token_scores"]
    )
    limit = symmetric_limit(scores)
    n = page.locator("#tokens .token").count()
    assert n == len(scores)
    for i in range(n):
        token = page.locator(f"#token-{i}")
        score = float(token.get_attribute("data-score"))
        assert score == pytest.approx(scores[i], rel=1e-3, abs=1e-5 * limit)
        shown = rgb_of(token.evaluate("(el) => getComputedStyle(el).backgroundColor"))
        assert np.abs(shown - colormap(np.asarray(scores[i]), limit).astype(int)).max() <= 2, i


def test_box_typed_by_keyboard(page):
    for name, value in zip(("x0", "y0", "x1", "y1"), (16, 0, 48, 32), strict=True):
        page.fill(f"#box-{name}", str(value))
    page.click("#box-apply")
    assert page.evaluate("state.box") == [16, 0, 48, 32]
    page.fill("#box-x1", "5")
    page.click("#box-apply")
    assert "x0 < x1" in page.text_content("#error-box")


def test_downloads(page, image_png, api):
    """The downloaded overlay PNG has the pixels of the API's PNG for the same selection and opacity."""
    page.evaluate("setBox(null)")
    page.focus("#token-2")
    page.keyboard.press("Enter")
    page.keyboard.press("Shift+ArrowRight")
    assert page.get_attribute("#overlay", "data-selection") == "2:4"
    with page.expect_download() as info:
        page.click("#download-png")
    image = np.asarray(Image.open(info.value.path()).convert("RGB")).astype(int)
    assert image.shape[1::-1] == Image.open(io.BytesIO(image_png)).size
    alpha = float(page.input_value("#opacity"))
    reply = api.get(f"/jobs/{page.job_id}/heatmap.png", params={"tokens": "2:4", "alpha": alpha})
    assert reply.status_code == 200, reply.text
    expected = np.asarray(Image.open(io.BytesIO(reply.content))).astype(int)
    difference = np.abs(image - expected)
    # The canvas composites in 8-bit steps of its own: allow 2 levels per channel, well under 0.5 on average.
    assert difference.max() <= 2, difference.max()
    assert difference.mean() < 0.5
    with page.expect_download() as info:
        page.click("#download-json")
    downloaded = json.loads(open(info.value.path()).read())
    assert downloaded["id"] == page.job_id and downloaded["status"] == "done"


def test_opacity_slider(page):
    page.fill("#opacity", "0.25")
    page.dispatch_event("#opacity", "input")
    assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0.25"


def test_errors_next_to_their_fields(browser, service_url, tmp_path, image_file, screenshots):
    page = open_page(browser, service_url, LAPTOP)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.set_input_files("#image-input", str(bad))
    page.fill("#captions", CAPTION)
    page.click("#explain-button")
    page.wait_for_selector("#error-image:not(:empty)", timeout=30_000)
    message = page.text_content("#error-image")
    assert "image" in message.lower()
    assert page.is_hidden("#result")
    page.screenshot(path=screenshots / "05-bad-file.png", full_page=True)
    # A missing caption is reported next to the captions field, before any request.
    page.fill("#captions", "")
    page.click("#explain-button")
    assert "caption" in page.text_content("#error-captions").lower()
    # An option the API refuses is reported next to that option.
    page.set_input_files("#image-input", str(image_file))
    page.fill("#captions", CAPTION)
    page.fill("#steps", "100000")
    page.click("#explain-button")
    page.wait_for_selector("#error-steps:not(:empty)", timeout=30_000)
    assert "steps" in page.text_content("#error-steps").lower()
    assert page.text_content("#error-image") == "" and page.text_content("#error-general") == ""
    page.close()


def test_phone_width(browser, service_url, image_file, screenshots):
    page = open_page(browser, service_url, PHONE)
    explain_on_page(page, image_file)
    page.click("#token-2")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    stage = page.locator("#stage").bounding_box()
    assert stage["width"] <= PHONE["width"] and stage["width"] > PHONE["width"] * 0.6
    page.screenshot(path=screenshots / "06-phone.png", full_page=True)
    assert page.js_errors == []
    page.close()


def test_api_key_field(browser, session_launcher, image_file, screenshots):
    proc = session_launcher.embedded(EXCLIP_API_KEYS="s3cret-key")
    proc.wait_ready()
    page = open_page(browser, proc.url, LAPTOP)
    page.wait_for_selector("#field-key:not([hidden])")
    assert "key" in page.text_content("#error-key").lower()
    page.screenshot(path=screenshots / "07-api-key-needed.png", full_page=True)
    page.fill("#api-key", "s3cret-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    assert explain_on_page(page, image_file)
    page.close()
    proc.stop()
