"""``service.parsing``: a JSON body is bounded by the request limits before it is parsed."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.errors import RequestInvalid
from service.parsing import check_json_values, json_value_limit, parse_json
from service.settings import Settings
from tests.service.conftest import png_bytes

LIMITS = Settings(max_captions=3, max_selections=4, max_caption_chars=20)


@st.composite
def requests_within_limits(draw: st.DrawFn) -> dict:
    """Any JSON request within LIMITS, captions written with the characters that count most."""
    text = st.text(alphabet=',[]{}a é🐕"\\', max_size=LIMITS.max_caption_chars)
    n = draw(st.integers(1, LIMITS.max_captions))
    selections = st.one_of(
        st.fixed_dictionaries({"span": st.tuples(st.integers(0, 9), st.integers(0, 9))}),
        st.fixed_dictionaries({"box": st.tuples(*[st.floats(0, 1e6)] * 4)}),
    )
    budget = draw(st.integers(0, LIMITS.max_selections))
    captions = []
    for _ in range(n):
        k = draw(st.integers(0, budget))
        budget -= k
        captions.append(
            {"text": draw(text), "selections": draw(st.lists(selections, min_size=k, max_size=k))}
        )
    options = draw(
        st.fixed_dictionaries({}, optional={"steps": st.integers(1, 100), "alpha": st.floats(0, 1)})
    )
    return {"image": base64.b64encode(b"\x89PNG" * 50).decode(), "captions": captions, **options}


@given(requests_within_limits())
@settings(max_examples=200, deadline=None)
def test_no_request_within_the_limits_is_refused_by_the_value_count(request_body: dict) -> None:
    for text in (json.dumps(request_body), json.dumps(request_body, indent=2, ensure_ascii=False)):
        check_json_values(text.encode(), json_value_limit(LIMITS))


def test_a_body_of_many_tiny_values_is_refused_before_it_is_parsed() -> None:
    limit = json_value_limit(LIMITS)
    body = b'{"image": "", "captions": [' + b'"",' * limit + b'""]}'
    with pytest.raises(RequestInvalid, match=f"more than {limit} values"):
        check_json_values(body, limit)
    # Parsed, the same body would be valid JSON of the right shape: the captions' count is only
    # checked after the job is built, from the parsed list.
    assert len(parse_json(body).captions) == limit + 1


def test_over_http_many_captions_get_422_naming_the_limits() -> None:
    body = b'{"image": "", "captions": [' + b'"",' * 1_000_000 + b'""]}'  # 3 MB
    with TestClient(create_app(Settings(redis_url=None))) as client:
        reply = client.post("/explain", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 422
        assert "EXCLIP_MAX_CAPTIONS" in reply.json()["detail"]
        # A request within the limits still gets through the bound (to the missing worker's 503).
        ok = {"image": base64.b64encode(png_bytes()).decode(), "captions": ["a red circle"]}
        assert client.post("/explain", json=ok).status_code == 503
