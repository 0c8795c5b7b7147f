"""explain_requests and the result format: typed round trips, prepared images, and aligned shapes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attribution.errors import (
    CaptionTooLong,
    CaptionTooManyCharacters,
    EmptyCaption,
    InvalidImage,
    InvalidSelection,
    SpecialTokenText,
)
from attribution.geometry import ImageGeometry
from attribution.images import prepare_image
from attribution.pipeline import ExplainRequest, Explanation, SelectionResult, explain_requests
from attribution.selections import Box, Span, TokenRange
from attribution.text import Token


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def explanation(tiny_model) -> Explanation:
    image = Image.open(io.BytesIO(png(64, 48, seed=2))).convert("RGB")
    selections = [Span(2, 5), TokenRange(1, 3), Box(10, 5, 40, 30)]
    [[e]] = explain_requests(tiny_model, [ExplainRequest(image, ["a dog on grass"], [selections])], steps=3)
    return e


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_result_json_reads_back_typed_and_writes_the_same_bytes(explanation, fmt):
    text = json.dumps(explanation.to_dict(fmt))
    back = Explanation.from_dict(json.loads(text))
    assert json.dumps(back.to_dict(fmt)) == text
    assert back.geometry == explanation.geometry
    assert torch.equal(back.result.interactions, explanation.result.interactions)  # float32 both ways
    assert [t.to_dict() for t in back.tokens] == [t.to_dict() for t in explanation.tokens]
    assert all(t.id is None for t in back.tokens)  # results carry no vocabulary ids


def test_result_keeps_its_documented_keys(explanation):
    d = explanation.to_dict()
    assert list(d) == [
        "caption",
        "model",
        "options",
        "tokens",
        "image",
        "grid",
        "interactions",
        "cls",
        "extra_columns",
        "extra_rows",
        "corner",
        "score",
        "completeness",
        "selections",
    ]
    assert list(d["image"]) == ["width", "height", "crop_box", "patch_size"]  # the grid has its own key
    assert d["grid"] == {"rows": 4, "cols": 4}
    d["timings"] = {"queued_ms": 1.0}  # added by the service; reading back ignores it
    assert Explanation.from_dict(d).caption == "a dog on grass"


def test_extra_rows_and_columns_add_up_to_the_total_and_round_trip(explanation):
    """CLIP: the class token is the one extra column (also under ``cls``); everything sums to total."""
    d = json.loads(json.dumps(explanation.to_dict()))
    assert list(d["extra_columns"]) == ["cls"] and d["extra_columns"]["cls"] == d["cls"]
    assert d["extra_rows"] == {} and d["corner"] == 0.0
    total = torch.tensor(d["interactions"]).sum() + sum(
        torch.tensor(v).sum() for v in d["extra_columns"].values()
    )
    assert float(total) == pytest.approx(d["completeness"]["total"], rel=1e-5, abs=1e-6)
    for matrix_format in ("json", "base64"):
        back = Explanation.from_dict(json.loads(json.dumps(explanation.to_dict(matrix_format))))
        assert torch.equal(back.result.entries(), explanation.result.entries())


def test_a_result_written_before_the_extra_keys_reads_back_with_its_class_column(explanation):
    d = explanation.to_dict()
    for key in ("extra_columns", "extra_rows", "corner"):
        del d[key]
    back = Explanation.from_dict(d).result
    assert set(back.extra_columns) == {"cls"} and torch.equal(
        back.extra_columns["cls"], explanation.result.cls
    )


def test_parts_round_trip(explanation):
    g = explanation.geometry
    assert ImageGeometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    t = explanation.tokens[1]
    assert Token.from_dict(t.to_dict()) == Token(t.index, None, t.text, t.start, t.end)
    for s in explanation.selections:
        back = SelectionResult.from_dict(json.loads(json.dumps(s.to_dict())))
        assert back.selection == s.selection and back.to_dict() == s.to_dict()


def test_prepared_image_gives_the_same_explanation(tiny_model):
    data = png(50, 70, seed=4)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    [[a]] = explain_requests(tiny_model, [ExplainRequest(decoded, ["a cat"])], steps=2)
    prepared = prepare_image(data, tiny_model)
    [[b]] = explain_requests(tiny_model, [ExplainRequest(prepared, ["a cat"])], steps=2)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


def test_box_outside_the_crop_region_is_refused_before_compute(tiny_model):
    image = Image.new("RGB", (640, 480))  # the model sees x in [76.19, 563.81]
    request = ExplainRequest(image, ["a dog"], [[Box(0, 0, 50, 50)]])
    with pytest.raises(InvalidSelection, match="does not overlap the part of the image the model sees"):
        explain_requests(tiny_model, [request], steps=1)


REFUSED = (EmptyCaption, SpecialTokenText, CaptionTooLong, CaptionTooManyCharacters)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caption=st.text(max_size=60) | st.sampled_from(["a photo <end_of_text> of a red ball", "x\x85y"]))
def test_every_accepted_caption_has_one_row_per_token(caption, tiny_model):
    # issue 10: a literal "<end_of_text>" gave 9 tokens but 4 rows of interactions, cls and scores
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    try:
        [[e]] = explain_requests(
            tiny_model, [ExplainRequest(image, [caption], [[Box(0, 0, 32, 32)]])], steps=1
        )
    except REFUSED:
        return
    d = e.to_dict()
    n = len(d["tokens"])
    assert n == len(d["interactions"]) == len(d["cls"]) == len(d["selections"][0]["token_scores"])
    assert d["tokens"][0]["index"] == 0 and d["tokens"][-1]["index"] == n - 1


def test_limits_pass_through(tiny_model):
    image = Image.new("RGB", (64, 32))
    request = ExplainRequest(image, ["a red ball"])
    with pytest.raises(CaptionTooManyCharacters, match="limit is 5"):
        explain_requests(tiny_model, [request], steps=1, max_caption_chars=5)
    [[e]] = explain_requests(tiny_model, [request], steps=1, max_caption_chars=10)
    assert e.caption == "a red ball"
    with pytest.raises(InvalidImage, match="exceeds 1.5 times"):
        explain_requests(tiny_model, [ExplainRequest(image, ["a dog"])], steps=1, max_aspect_ratio=1.5)
