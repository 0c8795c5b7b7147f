"""GET /jobs/{id}/heatmap.png under pressure: the render slots (EXCLIP_MAX_RENDERS), 410 once the byte
budget (EXCLIP_MAX_STORED_BYTES) evicted a job's image or result, and a render path that never copies
the upload at full size (its memory figures are in bench/hostile_uploads.py, not in a timed test).

The service runs in this process (``embedded_in_process``: API and worker on the in-memory queue),
so a render can be held deterministically and the queue looked into.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from attribution import decode
from attribution.decode import decode_image
from service.routers import heatmap
from service.web.render import render_overlay, render_png
from testing import spy_conversions
from tests.service.conftest import embedded_in_process, png_bytes


def explain(client, image: bytes, caption: str = "a dog on the grass") -> str:
    """POST /explain; the id of the done job."""
    r = client.post(
        "/explain", files={"image": ("x.png", image, "image/png")}, data={"caption": caption, "wait": "30"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "done"
    return r.json()["id"]


# --- render slots -------------------------------------------------------------------------------


def test_a_render_beyond_the_slots_waits_then_gets_503_with_retry_after(tiny_loaded, monkeypatch):
    """One slot (EXCLIP_MAX_RENDERS=1) held by a render: the next request waits SLOT_WAIT_S for it, then
    gets 503 + Retry-After naming the setting, without rendering; once freed, the slot serves again."""
    monkeypatch.setenv("EXCLIP_MAX_RENDERS", "1")
    monkeypatch.setattr(heatmap, "SLOT_WAIT_S", 0.3)
    holding, release = threading.Event(), threading.Event()
    renders: list[int] = []

    def render_png_held(*args, **kwargs) -> bytes:
        renders.append(len(renders))
        if len(renders) == 1:  # the first render keeps its slot until the test lets it go
            holding.set()
            assert release.wait(30), "the test never released the first render"
        return b"\x89PNG stand-in"

    monkeypatch.setattr(heatmap, "render_png", render_png_held)
    with embedded_in_process(tiny_loaded) as client:
        job = explain(client, png_bytes(64, 48, seed=1))
        url = f"/jobs/{job}/heatmap.png"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.get, url)
            try:
                assert holding.wait(30), "the first render never started"
                t0 = time.monotonic()
                refused = client.get(url, params={"legend": "true"})
                waited = time.monotonic() - t0
            finally:
                release.set()
            assert first.result(30).status_code == 200
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "2"
        detail = refused.json()["detail"]
        assert "EXCLIP_MAX_RENDERS" in detail and "1 heatmaps are being rendered" in detail
        assert waited >= 0.3  # it waited for a slot before giving up
        assert renders == [0]  # the refused request rendered nothing
        again = client.get(url)  # the held slot was given back
        assert again.status_code == 200 and again.content == b"\x89PNG stand-in"
        assert renders == [0, 1]


# --- byte budget: 410 once evicted -------------------------------------------------------------


def test_evicted_image_then_result_answer_410_naming_the_budget(tiny_loaded, monkeypatch):
    """Budget = C's image. A (done) keeps image and result; B's image needs A's image (A's heatmap: 410,
    A itself still 200); C's image needs B's image and the finished results (A: 410 everywhere)."""
    image_a, image_b = png_bytes(160, 150, seed=11), png_bytes(160, 150, seed=12)
    image_c = png_bytes(200, 200, seed=13)
    budget = len(image_c)
    assert 0.5 * budget < len(image_a) and len(image_a) + len(image_b) > budget
    monkeypatch.setenv("EXCLIP_MAX_STORED_BYTES", str(budget))
    with embedded_in_process(tiny_loaded) as client:
        queue = client.app.state.queue
        a = explain(client, image_a)
        assert client.get(f"/jobs/{a}/heatmap.png").status_code == 200
        result_a = client.get(f"/jobs/{a}").json()["result"]
        assert len(image_a) < client.portal.call(queue.stored_bytes) <= budget  # A's image and result

        b = explain(client, image_b)
        png_a = client.get(f"/jobs/{a}/heatmap.png")
        assert png_a.status_code == 410, png_a.text
        assert png_a.json()["detail"] == (
            f"the image of job {a} was dropped to keep the stored bytes within their budget "
            "(EXCLIP_MAX_STORED_BYTES); submit the job again"
        )
        kept = client.get(f"/jobs/{a}")  # its result is still there: only the image went
        assert kept.status_code == 200 and kept.json()["result"] == result_a
        assert client.get(f"/jobs/{b}/heatmap.png").status_code == 200

        explain(client, image_c)  # needs the whole budget: B's image and the finished results go
        gone = client.get(f"/jobs/{a}")
        assert gone.status_code == 410, gone.text
        body = gone.json()
        assert body["detail"] == (
            f"the result of job {a} was dropped to keep the stored bytes within their budget "
            "(EXCLIP_MAX_STORED_BYTES); submit the job again"
        )
        assert (body["id"], body["status"], body["result"]) == (a, "done", None)
        png_a = client.get(f"/jobs/{a}/heatmap.png")
        assert png_a.status_code == 410 and "result of job" in png_a.json()["detail"]
        assert "EXCLIP_MAX_STORED_BYTES" in png_a.json()["detail"]
        assert client.get(f"/jobs/{b}").status_code == 410
        assert client.portal.call(queue.stored_bytes) <= budget


# --- the render path: no full-size copy of the upload ----------------------------------------------


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def _scene(width: int, height: int) -> np.ndarray:
    """A smooth RGB picture with structure (gradients, a disc), so resampling differences stay small."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2) * 90
    return (
        np.stack(
            [x * 255 / width, y * 255 / height, (np.sin(x / 9) * np.cos(y / 13) + 1) * 80 + disc], axis=-1
        )
        .clip(0, 255)
        .astype(np.uint8)
    )


def _alpha(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.where((x // 40 + y // 30) % 2 == 0, 255, x * 255 // width).astype(np.uint8)


def _with_orientation(image: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, fmt, exif=exif.tobytes())


W, H = 300, 200
UPLOADS = {
    "RGB PNG": lambda: _encode(Image.fromarray(_scene(W, H))),
    "grey PNG": lambda: _encode(Image.fromarray(_scene(W, H)).convert("L")),
    "RGBA PNG": lambda: _encode(Image.fromarray(np.dstack([_scene(W, H), _alpha(W, H)]), "RGBA")),
    "LA PNG": lambda: _encode(Image.fromarray(np.dstack([_scene(W, H)[..., 0], _alpha(W, H)]), "LA")),
    "palette PNG with transparency": lambda: _encode(
        Image.fromarray(_scene(W, H)).quantize(64), transparency=0
    ),
    "16-bit grey PNG": lambda: _encode(Image.fromarray(_scene(W, H)[..., 1].astype(np.uint16) * 257)),
    "RGBA PNG, EXIF orientation 6": lambda: _with_orientation(
        Image.fromarray(np.dstack([_scene(W, H), _alpha(W, H)]), "RGBA"), 6, "PNG"
    ),
    "RGB PNG, EXIF orientation 3": lambda: _with_orientation(Image.fromarray(_scene(W, H)), 3, "PNG"),
    "RGB JPEG": lambda: _encode(Image.fromarray(_scene(W, H)), "JPEG", quality=95),
    "grey JPEG, EXIF orientation 8": lambda: _with_orientation(
        Image.fromarray(_scene(W, H)).convert("L"), 8, "JPEG"
    ),
    "CMYK JPEG": lambda: _encode(Image.fromarray(_scene(W, H)).convert("CMYK"), "JPEG", quality=95),
}


@pytest.mark.parametrize("name", list(UPLOADS))
@pytest.mark.parametrize("legend", [False, True])
def test_render_png_is_the_decoded_image_rendered_small(name, legend, monkeypatch):
    """``render_png`` of the bytes draws ``render_overlay(decode_image(bytes))``'s picture: the same size,
    orientation, alpha on white and overlay, up to the order of resampling (a JPEG is also decoded at a
    reduced scale). Bands of a few rows, so the band seams are checked too."""
    monkeypatch.setattr(decode, "BAND_PIXELS", 7 * W)  # a few rows per band
    data = UPLOADS[name]()
    decoded = decode_image(data)
    w, h = decoded.size
    heat = np.random.default_rng(3).normal(size=(4, 4))
    crop = (0.1 * w, 0.0, 0.9 * w, float(h)) if w > h else (0.0, 0.1 * h, float(w), 0.9 * h)
    box = (0.2 * w, 0.2 * h, 0.6 * w, 0.7 * h)
    want = render_overlay(decoded, heat, crop, alpha=0.6, box=box, legend=legend, max_side=100)
    got = Image.open(
        io.BytesIO(render_png(data, heat, crop, alpha=0.6, box=box, legend=legend, max_side=100))
    )
    assert got.mode == "RGB" and got.size == want.size
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int))
    if "JPEG" in name:  # decoded at half scale in the DCT, then resampled: a slightly different filter
        assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
    else:  # the same filter over the same pixels: rounding only
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.mean(), diff.max())


def test_the_heatmap_route_renders_an_rgba_upload_band_by_band(tiny_loaded, monkeypatch):
    """GET heatmap.png of a job with an RGBA upload goes through ``attribution.decode.decode_scaled``:
    the upload is converted a band at a time, never whole, and the PNG has the ``max_side`` size."""
    monkeypatch.setattr(decode, "BAND_PIXELS", 1 << 16)
    width, height = 1200, 900
    upload = _encode(Image.fromarray(np.dstack([_scene(width, height), _alpha(width, height)]), "RGBA"))
    with embedded_in_process(tiny_loaded) as client:
        job = explain(client, upload, "a disc on a gradient")
        converted = spy_conversions(monkeypatch)  # the render's conversions only
        r = client.get(f"/jobs/{job}/heatmap.png", params={"max_side": 256, "legend": "true"})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.size[0] == 256 and out.size[1] > 192
    assert len(converted) >= height // ((1 << 16) // width)
    assert max(h for _, h in converted) < height // 4, converted
