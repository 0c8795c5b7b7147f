"""Fixtures of the Label Studio tests: the headless Debian Chromium of tests/web (one per session)."""

from __future__ import annotations

from tests.web.conftest import browser  # noqa: F401 - a fixture, shared rather than copied
