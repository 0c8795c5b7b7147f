"""GET /jobs/{id}/heatmap.png against a real embedded service with the tiny model."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.web.render import COLORMAP_STOPS, colormap, symmetric_limit, upsample

CAPTION = "a yellow block on a gradient"


@pytest.fixture(scope="module")
def job(explain, image_png):
    return explain(image_png, CAPTION, [{"tokens": [1, 3]}, {"span": [2, 8]}])


def png(api, job_id: str, **params) -> Image.Image:
    response = api.get(f"/jobs/{job_id}/heatmap.png", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def whole_caption(caption: dict) -> np.ndarray:
    return np.asarray(caption["interactions"], dtype=np.float64).sum(axis=0)


def patch_of_pixel(caption: dict, x: int, y: int) -> tuple[int, int]:
    x0, y0 = caption["image"]["crop_box"][:2]
    pw, ph = caption["image"]["patch_size"]
    return int((y + 0.5 - y0) // ph), int((x + 0.5 - x0) // pw)


def test_size_mode_and_hottest_region(api, job, image_png):
    caption = job["result"]["captions"][0]
    original = Image.open(io.BytesIO(image_png))
    image = png(api, job["id"], alpha=1)
    assert image.size == original.size == (caption["image"]["width"], caption["image"]["height"])
    assert image.mode == "RGB"
    heat = whole_caption(caption)
    px = np.asarray(image).astype(int)
    _, inside = upsample(heat, caption["image"]["crop_box"], image.size[0], image.size[1])
    redness = np.where(inside, px[..., 0] - px[..., 2], -1000)  # outside the crop box: the image itself
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert patch_of_pixel(caption, x, y) == np.unravel_index(np.argmax(heat), heat.shape)


@pytest.mark.parametrize("selection", [{"tokens": "1:3"}, {"span": "2:8"}])
def test_selection_draws_the_api_heatmap(api, job, selection):
    """At alpha=1 the crop box shows exactly the colormap of the API's heatmap for that selection."""
    caption = job["result"]["captions"][0]
    kind, value = next(iter(selection.items()))
    api_heat = np.asarray(
        next(s for s in caption["selections"] if s["kind"] == kind and f"{s['start']}:{s['end']}" == value)[
            "heatmap"
        ]
    )
    image = np.asarray(png(api, job["id"], alpha=1, **selection)).astype(int)
    values, inside = upsample(api_heat, caption["image"]["crop_box"], image.shape[1], image.shape[0])
    expected = colormap(values, symmetric_limit(api_heat)).astype(int)
    assert np.abs(image - expected)[inside].max() <= 1
    hot = np.unravel_index(np.argmax(np.where(inside, image[..., 0] - image[..., 2], -1000)), inside.shape)
    assert patch_of_pixel(caption, hot[1], hot[0]) == np.unravel_index(np.argmax(api_heat), api_heat.shape)


def test_outside_crop_box_and_alpha(api, job, image_png):
    original = np.asarray(Image.open(io.BytesIO(image_png)).convert("RGB")).astype(int)
    crop = job["result"]["captions"][0]["image"]["crop_box"]
    assert crop[0] > 0  # a wide image: margins left and right the model does not see
    image = np.asarray(png(api, job["id"], alpha=0.5)).astype(int)
    left = int(crop[0])
    assert (image[:, :left] == original[:, :left]).all()
    assert np.abs(image[:, left : int(crop[2])] - original[:, left : int(crop[2])]).max() > 10
    assert (np.asarray(png(api, job["id"], alpha=0)).astype(int) == original).all()


def test_box_outline_and_legend(api, job):
    image = np.asarray(png(api, job["id"], box="20,10,60,50", alpha=0))
    assert (image[10, 30] == 0).all() and (image[30, 20] == 0).all()  # black outline edges
    with_legend = png(api, job["id"], legend="true", alpha=0.5)
    assert with_legend.size[0] == 96 and with_legend.size[1] > 64
    # Above the band: the same picture as without the legend; in the band: the bar from blue to red.
    plain = np.asarray(png(api, job["id"], alpha=0.5))
    assert (np.asarray(with_legend)[:64] == plain).all()
    bar_row = np.asarray(with_legend)[64 + 6].astype(int)
    blue, red = (np.array(s[1]) for s in (COLORMAP_STOPS[0], COLORMAP_STOPS[-1]))
    assert (bar_row[4] == blue).all() and (bar_row[96 - 4 - 1] == red).all()


def test_max_side_scales_the_png_down(api, job):
    small = png(api, job["id"], max_side=48, alpha=1)
    assert small.size == (48, 32)
    full = np.asarray(png(api, job["id"], alpha=1)).astype(int)
    # The small PNG is the full one at half size: compare with a 2x2 mean, colours within rounding.
    halved = full.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(small).astype(int) - halved).mean() < 6
    response = api.get(f"/jobs/{job['id']}/heatmap.png", params={"max_side": 5000})
    assert response.status_code == 422 and "max_side" in response.text


def test_base64_job_gives_the_same_png(api, explain, image_png, job):
    other = explain(image_png, CAPTION, format="base64")
    matrix = other["result"]["captions"][0]["interactions"]
    assert matrix["encoding"] == "base64-float32-le"
    decoded = np.frombuffer(base64.b64decode(matrix["data"]), "<f4").reshape(matrix["shape"])
    assert np.allclose(decoded, job["result"]["captions"][0]["interactions"], atol=1e-5)
    a = np.asarray(png(api, job["id"], alpha=1)).astype(int)
    b = np.asarray(png(api, other["id"], alpha=1)).astype(int)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"tokens": "5:2"}, "token"),
        ({"tokens": "1:999"}, "token"),
        ({"span": "abc"}, "START:END"),
        ({"tokens": "1:2:3"}, "malformed"),
        ({"box": "1,2,3"}, "x0,y0,x1,y1"),
        ({"box": "500,500,600,600"}, "outside"),
        ({"box": "0,0,10,64"}, "crop_box"),
        ({"span": "0:3", "box": "0,0,10,10"}, "at most one"),
        ({"caption": "3"}, "out of range"),
    ],
)
def test_bad_selection_is_422_with_a_message(api, job, params, words):
    response = api.get(f"/jobs/{job['id']}/heatmap.png", params=params)
    assert response.status_code == 422, response.text
    assert words.lower() in response.json()["detail"].lower()


def test_bad_alpha_is_422(api, job):
    response = api.get(f"/jobs/{job['id']}/heatmap.png", params={"alpha": 2})
    assert response.status_code == 422
    assert "alpha" in response.text


def test_unknown_job_is_404(api):
    response = api.get("/jobs/0123456789abcdef0123456789abcdef/heatmap.png")
    assert response.status_code == 404


def test_unfinished_job_is_409(api, image_png):
    # Heavy enough (16 captions, 100 steps) that the job cannot be done by the time we ask.
    files = {"image": ("a.png", image_png, "image/png")}
    data = {"caption": [f"caption number {i} about a yellow block" for i in range(16)], "steps": "100"}
    created = api.post("/jobs", files=files, data=data)
    assert created.status_code == 202, created.text
    response = api.get(f"/jobs/{created.json()['id']}/heatmap.png")
    assert response.status_code == 409, response.text
    assert "done" in response.json()["detail"]
    api.delete(f"/jobs/{created.json()['id']}")
