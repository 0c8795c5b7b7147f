"""Hostile ``/label-studio/predict`` and ``/setup`` bodies: strict types at the protocol edge, a 4xx
naming the field, never a 500 or a traceback, and each answer within a time bound.

The app runs in embedded mode with the tiny model in this process; task images come from a real HTTP
server standing in for Label Studio's upload server (``image_host``), so bodies that are valid get
predictions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import embedded_in_process
from tests.service.label_studio.scenario import CAPTION, DOCUMENTED, SCENE_PATH

ANSWER_BOUND_S = 20.0
"""Slowest answer allowed to any body here (a valid one computes one tiny-model job)."""


@pytest.fixture(scope="module")
def client(tiny_checkpoint: str, tiny_loaded, image_host: str) -> Iterator[TestClient]:
    with embedded_in_process(
        tiny_loaded,
        raise_server_exceptions=False,
        model="exclip-tiny",
        pretrained=tiny_checkpoint,
        device="cpu",
        label_studio_url=image_host,
    ) as client:
        yield client


def _interactive(value: object, to_name: str = "caption") -> dict:
    task = {"id": 1, "data": {"image": SCENE_PATH, "caption": CAPTION}}
    region = {"id": "r", "from_name": "phrase", "to_name": to_name, "type": "labels", "value": value}
    return {"tasks": [task], "label_config": DOCUMENTED, "params": {"context": {"result": [region]}}}


@pytest.mark.parametrize("result", [3, 2.5, True, False, "spans", {"start": 1}])
def test_a_context_result_that_is_not_a_list_is_422_naming_it(client: TestClient, result) -> None:
    body = {**_interactive({}), "params": {"context": {"result": result}}}
    reply = client.post("/label-studio/predict", json=body)
    assert reply.status_code == 422, reply.text
    assert ["body", "params", "context", "result"] in [e["loc"] for e in reply.json()["detail"]]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"start": 0.5, "end": 3.9}, "start"),  # was truncated to [0, 3]
        ({"start": 0, "end": 3.9}, "end"),
        ({"start": True, "end": 3}, "start"),  # was read as 1
        ({"start": "0", "end": 3}, "start"),
        ({"start": 0, "end": None}, "end"),
    ],
)
def test_span_offsets_must_be_integers(client: TestClient, value: dict, field: str) -> None:
    reply = client.post("/label-studio/predict", json=_interactive(value))
    assert reply.status_code == 422, reply.text
    assert f"params.context.result[0].value.{field} must be an integer" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"x": True, "y": 0, "width": 50, "height": 50}, "x"),
        ({"x": 0, "y": "10", "width": 50, "height": 50}, "y"),
        ({"x": 0, "y": 0, "width": [50], "height": 50}, "width"),
    ],
)
def test_box_coordinates_must_be_numbers(client: TestClient, value: dict, field: str) -> None:
    reply = client.post("/label-studio/predict", json=_interactive(value, to_name="image"))
    assert reply.status_code == 422, reply.text
    assert f"params.context.result[0].value.{field} is non-numeric" in reply.json()["detail"]


def test_integer_offsets_still_work(client: TestClient) -> None:
    reply = client.post("/label-studio/predict", json=_interactive({"start": 2, "end": 8}))
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("hostname", "message"),
    [
        ("::::", "is not an http(s) URL with a host"),
        ("ftp://x", "is not an http(s) URL with a host"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://169.254.169.254/", "169.254.169.254 is a link-local address"),
        ("http://[fe80::1]:8080", "link-local"),
        ("http://user:pw@ls:8080", "carries credentials"),
    ],
)
def test_setup_refuses_a_hostname_no_image_comes_from(
    client: TestClient, hostname: str, message: str
) -> None:
    reply = client.post(
        "/label-studio/setup", json={"project": "41.17", "schema": DOCUMENTED, "hostname": hostname}
    )
    assert reply.status_code == 422, reply.text
    (error,) = reply.json()["detail"]
    assert error["loc"] == ["body", "hostname"] and message in error["msg"]


@pytest.mark.parametrize(
    "hostname", ["http://[::1]:8080", "http://localhost:8080", "https://ls.example.org", ""]
)
def test_setup_takes_loopback_and_names(client: TestClient, hostname: str) -> None:
    reply = client.post(
        "/label-studio/setup", json={"project": "42.17", "schema": DOCUMENTED, "hostname": hostname}
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("name", ["mask_level", "min_token_score"])
def test_a_boolean_threshold_is_refused_not_read_as_one(client: TestClient, name: str) -> None:
    body = {"project": "43.17", "schema": DOCUMENTED, "extra_params": {name: True}}
    reply = client.post("/label-studio/setup", json=body)
    assert reply.status_code == 422, reply.text
    assert f"{name}: Value error, Input should be a number, not a boolean" in reply.json()["detail"]


# Any JSON value, small.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
scalars = st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=5), json_values)
numbers = st.integers(-5, 60) | st.floats(-5, 120, allow_nan=False) | st.booleans() | st.text(max_size=3)


def _or_any(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy`` mostly, any JSON value sometimes (so the bodies get past the first check often)."""
    return st.one_of(strategy, strategy, strategy, json_values)


regions = st.fixed_dictionaries(
    {
        "to_name": _or_any(st.sampled_from(["caption", "image"])),
        "value": _or_any(
            st.fixed_dictionaries({"start": numbers, "end": numbers})
            | st.fixed_dictionaries({"x": numbers, "y": numbers, "width": numbers, "height": numbers})
        ),
    },
    optional={"id": json_values, "type": json_values},
)
tasks = st.fixed_dictionaries(
    {
        "data": _or_any(
            st.fixed_dictionaries(
                {
                    "image": _or_any(st.sampled_from([SCENE_PATH, "/data/upload/1/none.png", "http://x/y"])),
                    "caption": _or_any(st.sampled_from([CAPTION, "", " "])),
                },
                optional={"phrases": _or_any(st.lists(st.sampled_from(["yellow", "blue field", "cat"])))},
            )
        ),
    },
    optional={"id": json_values, "project": json_values},
)
predict_bodies = st.fixed_dictionaries(
    {
        "tasks": _or_any(st.lists(tasks, min_size=1, max_size=3)),
        "label_config": _or_any(st.sampled_from([DOCUMENTED, DOCUMENTED, "<View/>", "<View"])),
        "params": _or_any(
            st.fixed_dictionaries(
                {
                    "context": _or_any(
                        st.fixed_dictionaries({"result": st.lists(regions, max_size=2) | json_values})
                    )
                }
            )
        ),
    },
    optional={"project": json_values},
)
setup_bodies = st.fixed_dictionaries(
    {},
    optional={
        "project": json_values,
        "schema": _or_any(st.sampled_from([DOCUMENTED, "<View"])),
        "hostname": _or_any(
            st.sampled_from(["http://127.0.0.1:8080", "::::", "ftp://x", "http://[::1"]) | st.text()
        ),
        "access_token": json_values,
        "extra_params": _or_any(
            st.dictionaries(st.sampled_from(["mask_level", "min_token_score", "other"]), numbers, max_size=2)
        ),
    },
)


def _assert_clean(client: TestClient, route: str, content: bytes) -> None:
    started = time.monotonic()
    reply = client.post(route, content=content, headers={"content-type": "application/json"})
    took = time.monotonic() - started
    assert reply.status_code in (200, 400, 413, 422, 502), (reply.status_code, reply.text[:500])
    if reply.status_code == 502:  # Label Studio's host did not give an interactive call's image
        assert "image" in reply.json()["detail"]
    elif reply.status_code != 200:
        assert "detail" in reply.json() and "Traceback" not in reply.text
    assert took < ANSWER_BOUND_S


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(predict_bodies)
def test_any_predict_body_gets_a_clean_answer_in_time(client: TestClient, body: dict) -> None:
    _assert_clean(client, "/label-studio/predict", json.dumps(body).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup_bodies)
def test_any_setup_body_gets_a_clean_answer_in_time(client: TestClient, body: dict) -> None:
    _assert_clean(client, "/label-studio/setup", json.dumps(body).encode())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["/label-studio/predict", "/label-studio/setup"]),
    st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
)
def test_any_bytes_get_a_clean_answer_in_time(client: TestClient, route: str, raw: bytes) -> None:
    _assert_clean(client, route, raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({"result": st.lists(regions, max_size=2) | scalars}) | scalars)
def test_any_context_of_a_valid_task_gets_a_clean_answer_in_time(client: TestClient, context) -> None:
    body = {**_interactive({}), "params": {"context": context}}
    _assert_clean(client, "/label-studio/predict", json.dumps(body).encode())
