"""Numbers at the HTTP edge are numbers: no booleans read as 1, no "5_0" read as 50, no fractions
truncated; the 422 names the field. The form's decimal text is still read (form fields are text)."""

from __future__ import annotations

import json

import pytest

from service.errors import RequestInvalid
from service.parsing import parse_json
from service.schemas import ExplainOptions, SelectionIn


def _json(**fields) -> bytes:
    return json.dumps({"image": "aGVsbG8=", "captions": ["a dog"], **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text_layer": True}, "text_layer: Value error, must be a number, not a boolean"),
        ({"image_layer": False}, "image_layer: Value error, must be a number, not a boolean"),
        ({"steps": "5_0"}, "steps: Value error, must be a decimal number, got '5_0'"),
        ({"steps": True}, "steps: Value error, must be a number, not a boolean"),
        ({"wait": True}, "wait: Value error, must be a number, not a boolean"),
        ({"tolerance": True}, "tolerance: Value error, must be a number, not a boolean"),
        ({"tolerance": "1_0e-3"}, "tolerance: Value error, must be a decimal number, got '1_0e-3'"),
        (
            {"captions": [{"text": "a dog", "selections": [{"span": [0.5, 3.9]}]}]},
            "span.0: Input should be a valid integer",
        ),
        (
            {"captions": [{"text": "a dog", "selections": [{"span": [True, 3]}]}]},
            "span: Value error, must be a number",
        ),
        (
            {"captions": [{"text": "a dog", "selections": [{"tokens": [1, "2_0"]}]}]},
            "tokens: Value error, must be a decimal",
        ),
        (
            {"captions": [{"text": "a dog", "selections": [{"box": [0, 0, True, 5]}]}]},
            "box: Value error, must be a number, not a boolean",
        ),
    ],
)
def test_lax_spellings_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(RequestInvalid, match=message) as raised:
        parse_json(_json(**fields))
    assert raised.value.status == 422


def test_numbers_and_the_forms_decimal_text_are_read() -> None:
    assert parse_json(_json(steps=5, text_layer=3, wait=1.5)).options.steps == 5
    options = ExplainOptions.model_validate({"steps": "7", "text_layer": " 2 ", "wait": "0.5"})
    assert (options.steps, options.text_layer, options.wait) == (7, 2, 0.5)
    assert SelectionIn.model_validate({"box": ["1", 2.5, "3e1", 40]}).box == (1.0, 2.5, 30.0, 40.0)
