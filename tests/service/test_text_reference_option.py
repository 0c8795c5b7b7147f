"""The ``text_reference`` option through the API, both back-ends: equal to the engine called directly,
its convention in the result's options, the aligned one closing the completeness gap, bad values a 422."""

from __future__ import annotations

import pytest

from attribution.decode import decode_image
from attribution.explainer import ALIGNED_REFERENCE, DEFAULT_TEXT_REFERENCE, TEXT_REFERENCES
from attribution.pipeline import ExplainRequest, explain_requests
from tests.service.conftest import assert_close, b64, png_bytes, strip_timings

IMAGE = png_bytes(48, 40, seed=32)
CAPTION = "a dog on the grass"


def direct(loaded, **options) -> list[dict]:
    request = ExplainRequest(decode_image(IMAGE), [CAPTION], [[]])
    [explanations] = explain_requests(loaded, [request], **options)
    return [e.to_dict() for e in explanations]


def test_form_aligned_reference_equals_the_engine_and_closes_the_gap(stack, tiny_loaded):
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": ("x.png", IMAGE, "image/png")},
            data={"caption": CAPTION, "steps": "3", "text_reference": ALIGNED_REFERENCE},
        )
    assert r.status_code == 200, r.text
    [got] = strip_timings(r.json()["result"])
    assert got["options"]["text_reference"] == ALIGNED_REFERENCE
    assert_close([got], direct(tiny_loaded, steps=3, text_reference=ALIGNED_REFERENCE))
    completeness = got["completeness"]
    assert completeness["path_expected"] == pytest.approx(completeness["expected"], abs=1e-6)


def test_naming_the_default_keeps_the_documented_keys(stack):
    with stack.client() as c:
        plain, named = (
            c.post("/explain", json={"image": b64(IMAGE), "captions": [CAPTION], "steps": 2, **extra})
            for extra in ({}, {"text_reference": DEFAULT_TEXT_REFERENCE})
        )
    assert strip_timings(plain.json()["result"]) == strip_timings(named.json()["result"])
    assert "text_reference" not in strip_timings(plain.json()["result"])[0]["options"]


@pytest.mark.parametrize("value", ["own", "", 1, True, None])
def test_an_unknown_convention_is_a_422_naming_the_field(stack, value):
    with stack.client() as c:
        r = c.post("/explain", json={"image": b64(IMAGE), "captions": [CAPTION], "text_reference": value})
    if value is None:  # null: the default
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 422, r.text
    assert "text_reference" in r.text


def test_models_lists_the_conventions(stack):
    with stack.client() as c:
        [model] = c.get("/models").json()["models"]
    option = model["options"]["text_reference"]
    assert option["conventions"] == list(TEXT_REFERENCES) and option["default"] == DEFAULT_TEXT_REFERENCE
