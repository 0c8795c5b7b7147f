"""The app builds FastAPI's route state while it starts, so the first caller does not pay for it."""

from __future__ import annotations

import logging

import fastapi.routing
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_route_state_is_built_at_start_up_not_on_the_first_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    built: list[str] = []
    original = fastapi.routing._populate_api_route_state

    def counting(route, path, *args, **kwargs):  # a spy: FastAPI's own function still does the work
        built.append(path)
        return original(route, path, *args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "_populate_api_route_state", counting)
    caplog.set_level(logging.INFO)
    with TestClient(create_app(Settings(redis_url=None))) as client:
        at_start = len(built)
        assert client.get("/models").status_code == 200
        assert client.post("/explain", data={"caption": "a cat"}).status_code == 422  # no image
        assert client.get("/jobs/unknown").status_code == 404
    assert at_start > 0
    assert built[at_start:] == [], "FastAPI built route state on a request, not at start-up"
    # The internal warm-up request is not logged as if a client had asked.
    assert not [r for r in caplog.records if "warm-up" in r.getMessage() and "404" in r.getMessage()]
