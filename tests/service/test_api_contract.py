"""The OpenAPI schema says what the routes do: the API key (security scheme and 401 on every route that
takes one), the two shapes of the heatmap's 422, the null layers; and the checks behind them (huge
integers in selections, repeated query parameters, NaN opacity) answer a short 422.

In-process (``TestClient``): the app object without a worker for the schema and auth, and the embedded
service with the tiny model (one computed job) for the heatmap and form checks.
"""

from __future__ import annotations

import logging

import jsonschema
import pytest

from tests.service.conftest import embedded_in_process, png_bytes

KEY = "k3y-not-for-logs"
AUTH = {"Authorization": f"Bearer {KEY}"}
HUGE = "9" * 5000  # more digits than Python's int() takes from a string (4300)
# Every route that needs the key when keys are configured (the Label Studio routes have their own auth).
KEYED = {
    ("POST", "/explain"),
    ("POST", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/heatmap.png"),
    ("GET", "/models"),
    ("GET", "/metrics"),
}


@pytest.fixture(scope="module")
def app():
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings(redis_url=None, api_keys=KEY))


@pytest.fixture(scope="module")
def openapi(app) -> dict:
    return app.openapi()


@pytest.fixture(scope="module")
def app_client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


def test_every_route_that_takes_a_key_declares_the_bearer_scheme_and_its_401(app_client, openapi):
    """Each operation of the schema is called without a key: those that answer 401 document it (and,
    outside the Label Studio routes, which take Basic auth too, declare the bearer scheme)."""
    scheme = openapi["components"]["securitySchemes"]["HTTPBearer"]
    assert (
        scheme["type"] == "http"
        and scheme["scheme"] == "bearer"
        and "EXCLIP_API_KEYS" in scheme["description"]
    )
    keyed = set()
    for path, operations in openapi["paths"].items():
        for method, op in operations.items():
            r = app_client.request(method, path.replace("{job_id}", "abc"))
            if r.status_code != 401:
                assert "security" not in op and "401" not in op["responses"], (method, path)
                continue
            assert "401" in op["responses"], (method, path)
            if path.startswith("/label-studio"):
                continue
            keyed.add((method.upper(), path))
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            unauthorized = op["responses"]["401"]
            schema = unauthorized["content"]["application/json"]["schema"]
            jsonschema.validate(r.json(), {**schema, "components": openapi["components"]})
            assert r.headers["www-authenticate"] == "Bearer" and "WWW-Authenticate" in unauthorized["headers"]
    assert keyed == KEYED


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, "missing API key: send the header 'Authorization: Bearer <key>'"),
        ("Bearer", "malformed Authorization header: send the API key as 'Authorization: Bearer <key>'"),
        ("Basic " + KEY, "malformed Authorization header: send the API key as 'Authorization: Bearer <key>'"),
        ("Bearer wrong-key-not-for-logs", "invalid API key"),
        (f"Bearer {KEY}x", "invalid API key"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/models"), ("GET", "/metrics"), ("GET", "/jobs/abc"), ("DELETE", "/jobs/abc"),
     ("GET", "/jobs/abc/heatmap.png"), ("POST", "/explain"), ("POST", "/jobs")],
)  # fmt: skip
def test_the_declared_scheme_leaves_the_401s_as_they_were(app_client, caplog, method, path, header, detail):
    caplog.set_level(logging.DEBUG)
    r = app_client.request(method, path, headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json() == {"detail": detail}
    assert r.headers["www-authenticate"] == "Bearer"
    assert "not-for-logs" not in caplog.text  # neither the key nor a wrong one is logged
    assert app_client.get("/models", headers=AUTH).status_code == 200


def test_null_layers_are_documented_as_the_models_default(openapi):
    body = openapi["paths"]["/explain"]["post"]["requestBody"]["content"]
    for schema in (body["application/json"]["schema"], body["multipart/form-data"]["schema"]):
        for name in ("text_layer", "image_layer"):
            description = schema["properties"][name]["description"]
            assert "the last" not in description
            assert "null: the model's default" in description and f"options.{name}.default" in description


# --- the heatmap's 422s and the selection checks, against a done job -------------------------------


@pytest.fixture(scope="module")
def served(tiny_loaded):
    """(client of the embedded service with API keys, id of a done job for the caption "a dog")."""
    with embedded_in_process(tiny_loaded, api_keys=KEY) as client:
        r = client.post(
            "/explain",
            files={"image": ("x.png", png_bytes(64, 48, seed=3), "image/png")},
            data={"caption": "a dog", "steps": "1", "wait": "30"},
            headers=AUTH,
        )
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        yield client, r.json()["id"]


def _documented_422(openapi: dict, path: str, method: str) -> dict:
    schema = openapi["paths"][path][method]["responses"]["422"]["content"]["application/json"]["schema"]
    return {**schema, "components": openapi["components"]}


@pytest.mark.parametrize(
    ("query", "words"),
    [
        # the route's own checks: a message
        ("span=0:2&tokens=1:2", "give at most one selection"),
        ("span=0:99", "out of range"),
        ("caption=3", "caption=3 is out of range"),
        ("span=0:2&span=0:3", "span may be given only once"),
        ("tokens=1:2&tokens=1:2&alpha=0.5&alpha=0.5", "tokens, alpha may be given only once"),
        (f"span=0:{HUGE}", "at most 9 digits"),
        (f"tokens={HUGE}:1", "at most 9 digits"),
        # FastAPI's parameter checks: a list of field errors
        ("alpha=2", "less than or equal to 1"),
        ("alpha=nan", "finite number"),
        ("alpha=inf", "finite number"),
        ("caption=-1", "greater than or equal to 0"),
        ("legend=maybe", "valid boolean"),
    ],
)
def test_heatmap_422s_match_the_documented_schema(served, openapi, query, words):
    client, job_id = served
    r = client.get(f"/jobs/{job_id}/heatmap.png?{query}", headers=AUTH)
    assert r.status_code == 422, r.text
    assert words in str(r.json()["detail"])
    assert len(r.text) < 600  # a 5000-digit value is not echoed whole
    jsonschema.validate(r.json(), _documented_422(openapi, "/jobs/{job_id}/heatmap.png", "get"))


def test_heatmap_nan_opacity_gets_the_finite_number_message(served):
    client, job_id = served
    [error] = client.get(f"/jobs/{job_id}/heatmap.png?alpha=nan", headers=AUTH).json()["detail"]
    assert error["loc"] == ["query", "alpha"] and error["msg"] == "Input should be a finite number"


def test_heatmap_single_selections_still_render(served):
    client, job_id = served
    for query in ("span=0:2", "tokens=1:3&alpha=0.3", "box=0,0,40,40&legend=true", ""):
        r = client.get(f"/jobs/{job_id}/heatmap.png?{query}", headers=AUTH)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), (query, r.text)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("span", f"0:{HUGE}"),
        ("span", f"{HUGE}:0:2"),
        ("token_range", f"1:{HUGE}"),
        ("token_range", f"{HUGE}:1:2"),
        ("box", f"{HUGE}:1,2,3,4"),
    ],
)
def test_form_selections_with_huge_integers_are_a_short_422(served, field, value):
    client, _ = served
    r = client.post(
        "/explain",
        files={"image": ("x.png", png_bytes(64, 48, seed=3), "image/png")},
        data={"caption": "a dog", field: value},
        headers=AUTH,
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "at most 9 digits" in detail and len(detail) < 400 and "9" * 100 not in detail
