"""Fixtures of the Label Studio tests: a headless Debian Chromium per module (tests/harness.py)."""

from __future__ import annotations

import pytest

from tests.harness import chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser
