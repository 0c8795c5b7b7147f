"""Auth on /label-studio: Label Studio sends Basic credentials, so the password may carry the API key."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(api_keys="k-one,k-two"))) as client:
        yield client


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (_basic("label-studio", "k-two"), 200),
        (_basic("", "k-one"), 200),
        (_basic("k-one", ""), 401),  # the key is the password, not the user name
        (_basic("label-studio", "k-three"), 401),
        ({"Authorization": "Basic !!not-base64!!"}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, 401),
        ({"Authorization": "Bearer k-one"}, 200),
        ({"Authorization": "Bearer k-three"}, 401),
    ],
)
def test_label_studio_routes(client: TestClient, headers: dict, status: int) -> None:
    reply = client.get("/label-studio/versions", headers=headers)
    assert reply.status_code == status, reply.text
    if status == 401:
        assert "k-one" not in reply.text and "k-two" not in reply.text


def test_health_is_open_and_other_routes_keep_bearer_only(client: TestClient) -> None:
    assert client.get("/label-studio/health").json()["status"] == "UP"
    assert client.get("/models", headers=_basic("u", "k-one")).status_code == 401
    assert client.get("/models", headers={"Authorization": "Bearer k-one"}).status_code == 200


def test_without_keys_everyone_may_call() -> None:
    with TestClient(create_app(Settings())) as client:
        assert client.get("/label-studio/versions").status_code == 200
        assert client.get("/label-studio/versions", headers=_basic("any", "thing")).status_code == 200


def test_webhook_takes_the_key_as_basic_password(client: TestClient) -> None:
    """Label Studio posts its events (here one it sends when an annotation is made) with Basic auth."""
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 5, "task": 3}}
    reply = client.post("/label-studio/webhook", json=event, headers=_basic("label-studio", "k-one"))
    assert 200 <= reply.status_code < 300, reply.text
    assert reply.json() == {"status": "ignored"}
    for headers in ({}, _basic("label-studio", "k-three")):
        assert client.post("/label-studio/webhook", json=event, headers=headers).status_code == 401
