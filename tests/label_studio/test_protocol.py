"""Task data and request parts: phrases, the annotator's context, thresholds from extra_params."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.label_studio import predictor
from service.label_studio.config import parse_label_config
from service.label_studio.errors import TaskInvalid
from service.label_studio.predictor import Context, _phrase_spans, parse_context
from service.label_studio.protocol import MAX_TASKS, PredictIn, SetupIn, Thresholds
from tests.label_studio.scenario import DOCUMENTED

CONFIG = parse_label_config(DOCUMENTED)
CAPTION = "A 🐕 chases a Red ball"


def test_phrases_as_strings_pairs_or_nothing() -> None:
    assert _phrase_spans(CAPTION, None, 64) == [(0, len(CAPTION))]
    # Whole words first, exact case first; pairs count characters (the emoji is one); no phrase twice
    assert _phrase_spans(CAPTION, ["🐕 chases", "red ball", [13, 21], [2, 3]], 64) == [
        (2, 10),
        (13, 21),
        (2, 3),
    ]
    assert _phrase_spans(CAPTION, ["a", "ball", "Red"], 2) == [(11, 12), (17, 21)]  # capped at 2
    assert _phrase_spans(CAPTION, ["A", "hase"], 64) == [(0, 1), (5, 9)]


def test_a_phrase_longer_than_the_caption_compiles_no_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    """It cannot match; a long phrase's pattern would take seconds to compile (re parses in Python)."""
    monkeypatch.setattr(predictor, "re", None)  # any pattern work would fail
    with pytest.raises(TaskInvalid, match="not in the caption"):
        _phrase_spans(CAPTION, [CAPTION + " " + "x" * 100_000], 64)


@pytest.mark.parametrize(
    ("phrases", "message"),
    [
        (["a cat"], "not in the caption"),
        ([" "], "not in the caption"),
        ([[5, 3]], "does not fit"),
        ([[0, 99]], "does not fit"),
        ([[0, True]], "neither a string"),
        ([{"start": 0}], "neither a string"),
        ("a dog", "must be a list"),
    ],
)
def test_bad_phrases(phrases, message: str) -> None:
    with pytest.raises(TaskInvalid, match=message):
        _phrase_spans(CAPTION, phrases, 64)


def test_context_span_or_box() -> None:
    assert parse_context(None, CONFIG) is None
    assert parse_context({"result": []}, CONFIG) is None
    span = {"from_name": "phrase", "to_name": "caption", "type": "labels", "value": {"start": 2, "end": 3}}
    assert parse_context({"result": [span]}, CONFIG) == Context(span=(2, 3))
    box = {
        "from_name": "region",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {"x": 10, "y": 20.5, "width": 30, "height": 40},
    }
    assert parse_context({"result": [box]}, CONFIG) == Context(box=(10.0, 20.5, 30.0, 40.0))
    with pytest.raises(TaskInvalid, match="no span"):
        parse_context({"result": [{"to_name": "other", "value": {"start": 1, "end": 2}}]}, CONFIG)
    with pytest.raises(TaskInvalid, match="non-numeric"):
        parse_context({"result": [{**box, "value": {**box["value"], "x": "left"}}]}, CONFIG)


def test_thresholds_from_extra_params() -> None:
    defaults = Thresholds(mask_level=0.5, min_token_score=0.5)
    assert defaults.updated(None) == defaults
    assert defaults.updated({"mask_level": 0.8, "unrelated": "kept by Label Studio"}) == Thresholds(
        mask_level=0.8, min_token_score=0.5
    )
    for bad in ({"mask_level": 0}, {"mask_level": 1.5}, {"min_token_score": -0.1}, {"mask_level": "high"}):
        with pytest.raises(TaskInvalid, match="extra_params"):
            defaults.updated(bad)
    assert SetupIn.model_validate({"extra_params": '{"mask_level": 0.7}'}).extra_params == {"mask_level": 0.7}


@pytest.mark.parametrize("value", [float("nan"), "NaN", float("inf"), "-inf"])
def test_thresholds_that_are_not_finite_numbers_say_so(value) -> None:
    defaults = Thresholds(mask_level=0.5, min_token_score=0.5)
    for name in ("mask_level", "min_token_score"):
        with pytest.raises(TaskInvalid, match=f"{name}: Input should be a finite number"):
            defaults.updated({name: value})


def test_tasks_per_call_are_bounded() -> None:
    assert len(PredictIn.model_validate({"tasks": [{}] * MAX_TASKS}).tasks) == MAX_TASKS
    with pytest.raises(ValidationError, match=f"at most {MAX_TASKS} items"):
        PredictIn.model_validate({"tasks": [{}] * (MAX_TASKS + 1)})
