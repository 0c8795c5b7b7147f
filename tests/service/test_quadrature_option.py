"""The ``quadrature`` and ``tolerance`` options through the API, both back-ends: results equal the
engine called directly, the result says how it was integrated, bad combinations are a clear 422."""

from __future__ import annotations

import pytest

from attribution.decode import decode_image
from attribution.pipeline import ExplainRequest, explain_requests
from attribution.quadrature import DEFAULT_RULE, RULES, TOLERANCE_MAX_POINTS, nested_sizes
from tests.service.conftest import assert_close, b64, png_bytes, strip_timings

IMAGE = png_bytes(48, 40, seed=31)
CAPTION = "a dog on the grass"


def direct(loaded, **options) -> list[dict]:
    request = ExplainRequest(decode_image(IMAGE), [CAPTION], [[]])
    [explanations] = explain_requests(loaded, [request], **options)
    return [e.to_dict() for e in explanations]


def test_form_quadrature_equals_the_engine(stack, tiny_loaded):
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": ("x.png", IMAGE, "image/png")},
            data={"caption": CAPTION, "steps": "3", "quadrature": "gauss-legendre"},
        )
    assert r.status_code == 200, r.text
    [got] = strip_timings(r.json()["result"])
    assert got["integration"] == {
        "rule": "gauss-legendre",
        "points": 3,
        "tolerance": None,
        "error_estimate": None,
        "converged": None,
    }
    assert_close([got], direct(tiny_loaded, steps=3, quadrature="gauss-legendre"))


def test_json_tolerance_equals_the_engine_and_reports_its_estimate(stack, tiny_loaded):
    with stack.client() as c:
        r = c.post("/explain", json={"image": b64(IMAGE), "captions": [CAPTION], "tolerance": 1e-2})
    assert r.status_code == 200, r.text
    [got] = strip_timings(r.json()["result"])
    info = got["integration"]
    assert info["rule"] == "clenshaw-curtis" and info["tolerance"] == 1e-2
    assert info["points"] in nested_sizes()
    assert info["converged"] is (info["error_estimate"] <= 1e-2)
    assert info["converged"] or info["points"] == TOLERANCE_MAX_POINTS
    assert_close([got], direct(tiny_loaded, tolerance=1e-2))


def test_default_rule_keeps_the_documented_keys(stack):
    """Naming the default rule is the same as naming none: same numbers, no ``integration`` key."""
    with stack.client() as c:
        plain, named = (
            c.post("/explain", json={"image": b64(IMAGE), "captions": [CAPTION], "steps": 2, **extra})
            for extra in ({}, {"quadrature": DEFAULT_RULE})
        )
    assert plain.status_code == named.status_code == 200, (plain.text, named.text)
    [got_plain] = strip_timings(plain.json()["result"])
    [got_named] = strip_timings(named.json()["result"])
    assert "integration" not in got_plain and "integration" not in got_named
    assert got_plain["interactions"] == got_named["interactions"]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"quadrature": "simpson"}, "quadrature"),
        ({"quadrature": "trapezoid", "steps": 1}, "needs at least 2 points"),
        ({"quadrature": "gauss-legendre", "tolerance": 1e-2}, "a tolerance needs a nested rule"),
        ({"tolerance": 0}, "tolerance"),
        ({"tolerance": 1.5}, "tolerance"),
    ],
)
def test_bad_integration_options_are_422(stack, fields, message):
    with stack.client() as c:
        r = c.post("/explain", json={"image": b64(IMAGE), "captions": [CAPTION], **fields})
    assert r.status_code == 422, r.text
    assert message in r.text


def test_models_lists_the_rules_and_the_tolerance_range(stack):
    with stack.client() as c:
        [model] = c.get("/models").json()["models"]
    quadrature, tolerance = model["options"]["quadrature"], model["options"]["tolerance"]
    assert quadrature["rules"] == list(RULES) and quadrature["default"] == DEFAULT_RULE
    assert quadrature["min_steps"]["trapezoid"] == 2
    assert (tolerance["min_exclusive"], tolerance["max_exclusive"]) == (0, 1)
    assert tolerance["points"][-1] == TOLERANCE_MAX_POINTS
