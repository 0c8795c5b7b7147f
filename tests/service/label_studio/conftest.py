"""Fixtures of the Label Studio tests: a headless Debian Chromium per module (``testing.chromium``), and a
stand-in for Label Studio's upload server holding the scenario's image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testing import chromium
from tests.service.label_studio.scenario import SCENE_PATH, file_server, scene_png


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a server that gives ``scene_png()`` at ``SCENE_PATH``, as Label Studio gives uploads."""
    root = tmp_path_factory.mktemp("ls-host")
    (root / SCENE_PATH.lstrip("/")).parent.mkdir(parents=True)
    (root / SCENE_PATH.lstrip("/")).write_bytes(scene_png())
    with file_server(root) as url:
        yield url
