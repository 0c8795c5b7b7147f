"""Task data and request parts: phrases, the annotator's context, thresholds from extra_params."""

from __future__ import annotations

import contextlib
import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.label_studio import tasks
from service.label_studio.config import parse_label_config
from service.label_studio.errors import TaskInvalid
from service.label_studio.protocol import (
    MAX_DEPTH,
    MAX_KEPT_VALUES,
    MAX_TASKS,
    TASK_FIELDS,
    PredictIn,
    SetupIn,
    Thresholds,
    parse_predict,
)
from service.label_studio.tasks import Context, parse_context
from service.label_studio.tasks import phrase_spans as _phrase_spans
from tests.service.label_studio.scenario import DOCUMENTED

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
    monkeypatch.setattr(tasks, "re", None)  # any pattern work would fail
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


# --- parse_predict: the /predict body streamed --------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from(["tasks", "project", "label_config", "params", "model_version", "other"]),
    json_values
    | st.lists(
        st.dictionaries(st.sampled_from([*TASK_FIELDS, "annotations", "predictions", "x"]), json_values),
        max_size=4,
    ),
)


def _outcome(parse, raw: bytes):
    try:
        return parse(raw).model_dump()
    except ValidationError as exc:
        return [(e["type"], e["loc"]) for e in exc.errors()]


def _read_of(task: dict) -> dict:
    """What the backend reads of a task: its data, and its id and project where they are scalars."""
    scalar = (str, int, float, bool, type(None))
    return {k: v for k, v in task.items() if k == "data" or k in TASK_FIELDS and isinstance(v, scalar)}


@given(bodies)
@settings(max_examples=300, deadline=None)
def test_the_streamed_body_is_what_pydantic_reads_of_the_fields_the_backend_uses(body: dict) -> None:
    raw = json.dumps(body).encode()
    if isinstance(body.get("tasks"), list):  # what parse_predict drops: the task fields nobody reads
        kept = [_read_of(t) if isinstance(t, dict) else t for t in body["tasks"]]
        body = body | {"tasks": kept}
    if isinstance(body.get("params"), dict):
        body = body | {"params": {k: v for k, v in body["params"].items() if k == "context"}}
    assert _outcome(parse_predict, raw) == _outcome(PredictIn.model_validate_json, json.dumps(body).encode())


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"{not json", b"\xff", b'{"tasks": [{}]} trailing', b'{"tasks": [{}]}{}', b"[1]"]
)
def test_a_malformed_body_is_refused_as_pydantic_refuses_it(raw: bytes) -> None:
    with pytest.raises(ValidationError) as streamed:
        parse_predict(raw)
    with pytest.raises(ValidationError) as whole:
        PredictIn.model_validate_json(raw)
    assert [e["type"] for e in streamed.value.errors()] == [e["type"] for e in whole.value.errors()]


def _peak_python_bytes(parse, raw: bytes) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(ValidationError, TaskInvalid):
            parse(raw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_what_is_read_not_the_body() -> None:
    # Label Studio sends each task's earlier predictions (brush masks: long integer lists), 10 MB here.
    mask = {"result": [{"value": {"rle": [7] * 5000, "brushlabels": ["Phrase"]}}]}
    task = {"id": 1, "data": {"image": "/data/upload/1/a.png", "caption": "a dog"}, "predictions": [mask]}
    with_masks = json.dumps({"tasks": [task] * MAX_TASKS, "label_config": "<View/>"}).encode()
    empty_tasks = b'{"tasks": [' + b"{}," * 2_000_000 + b"{}]}"  # 6 MB of tasks past the limit
    for raw in (with_masks, empty_tasks):
        assert _peak_python_bytes(parse_predict, raw) < 5_000_000  # 1000 tasks of kept data: 2.4 MB
    # The same bodies parsed whole: the bound above would fail.
    assert _peak_python_bytes(PredictIn.model_validate_json, with_masks) > 20_000_000


@pytest.mark.parametrize("field", ["predictions", "data", "id"])
def test_deep_nesting_is_refused_early_and_cheaply(field: str) -> None:
    # ijson.parse builds each event's path: memory growing with the square of the depth (a 200 KB
    # body took an API to 22 GB). Nested past MAX_DEPTH, anywhere, the body is refused.
    raw = b'{"tasks": [{"' + field.encode() + b'": ' + b"[" * 20_000 + b"]" * 20_000 + b"}]}"
    with pytest.raises(TaskInvalid, match=f"deeper than {MAX_DEPTH} levels"):
        parse_predict(raw)
    assert _peak_python_bytes(parse_predict, raw) < 5_000_000  # measured 2.5 MB
    nested_within = b'{"tasks": [{"data": ' + b"[" * (MAX_DEPTH - 3) + b"]" * (MAX_DEPTH - 3) + b"}]}"
    assert parse_predict(nested_within).tasks[0]["data"] is not None


def test_the_values_kept_of_a_body_are_bounded() -> None:
    phrases = [f"p{i}" for i in range(MAX_KEPT_VALUES)]
    raw = json.dumps({"tasks": [{"id": 1, "data": {"caption": "a", "phrases": phrases}}]}).encode()
    with pytest.raises(TaskInvalid, match=f"more than {MAX_KEPT_VALUES} values"):
        parse_predict(raw)
    within = json.dumps({"tasks": [{"id": 1, "data": {"phrases": phrases[:1000]}}] * 100}).encode()
    assert len(parse_predict(within).tasks) == 100
