"""Fixtures for the web tests: one embedded service with the tiny model, a real headless Chromium.

The service is ``python -m service.cli serve`` in embedded mode (in-memory queue and worker in one
process) from the shared ``session_launcher`` in tests/conftest.py, with saved tiny weights so
that separate jobs on the same input give the same matrix. The browser is Debian's Chromium driven
by Playwright (never ``playwright install``). Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from testing import ROOT, chromium

SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="session")
def image_png() -> bytes:
    """A 96x64 PNG: not square (so the crop box is not the whole image), with structure for the model."""
    width, height = 96, 64
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, np.full_like(x, 90), y * 255 // height], axis=-1).astype(np.uint8)
    arr[height // 4 : height // 2, width // 3 : width // 2] = (250, 240, 30)  # a yellow block
    arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def service_url(session_launcher) -> str:
    """Base URL of an embedded service with the tiny model (API and worker in one process)."""
    proc = session_launcher.embedded()
    proc.wait_ready()
    return proc.url


@pytest.fixture(scope="session")
def api(service_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def explain(api: httpx.Client):
    """``explain(image_bytes, caption, selections=None, **options)``: POST /explain (JSON), the done job."""
    return lambda *args, **kwargs: _explain(api, *args, **kwargs)


def _explain(
    api: httpx.Client, image: bytes, caption: str, selections: list[dict] | None = None, **options
) -> dict:
    body = {
        "image": base64.b64encode(image).decode(),
        "wait": 60,
        "format": "json",
        "captions": [{"text": caption, "selections": selections or []}],
        **options,
    }
    response = api.post("/explain", json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "done", job
    return job


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def pytest_terminal_summary(terminalreporter) -> None:
    """Say where the screenshots are (printed even when output is captured)."""
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.iterdir()):
        terminalreporter.write_line(f"web page screenshots: {SCREENSHOTS}")


@pytest.fixture(scope="module")
def browser():
    # Per module, not per session: Playwright's sync API keeps its event loop marked running in this
    # thread while the browser is open, and every async test that a test worker runs meanwhile (other
    # modules' tests, interleaved by pytest-xdist) then fails to start its own loop.
    with chromium() as browser:
        yield browser
