"""Fixtures of the Label Studio tests: a headless Debian Chromium per module (``testing.chromium``); the
stand-in for Label Studio's upload server (``image_host``) is tests/service/conftest.py's."""

from __future__ import annotations

import pytest

from testing import chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser
