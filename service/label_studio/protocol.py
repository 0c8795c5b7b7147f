"""The ML backend protocol's request bodies (Label Studio 1.23) and the backend's thresholds.

Label Studio sends more fields than these (task metadata, credentials); unknown ones are ignored.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import ijson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.label_studio.errors import ImageRefused, TaskInvalid
from service.label_studio.fetch import Origin, refused_literal


class SetupIn(BaseModel):
    """``POST /setup``: sent when a backend is connected and before every batch of predictions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    # The strings the backend keeps per project are bounded (see service.label_studio.projects).
    project: str = Field("", max_length=200)
    label_config: str | None = Field(None, alias="schema")
    hostname: str | None = Field(None, max_length=2048)
    access_token: str | None = Field(None, max_length=4096)
    extra_params: dict[str, Any] | None = None

    @field_validator("hostname")
    @classmethod
    def _label_studio_url(cls, value: str | None) -> str | None:
        """Where this project's images are fetched from: refused now, not at every task."""
        if value is None or not value.strip():
            return None
        return checked_label_studio_url(value)

    @field_validator("extra_params", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        """The backend form stores extra params as JSON; accept its text form too."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value


def checked_label_studio_url(url: str) -> str:
    """``url`` if images may be fetched from it: http(s) with a host, not an address that is never
    allowed (``fetch.refused_category``); else ``ValueError`` saying why. A host name is checked when
    it is resolved."""
    try:
        origin = Origin.parse(url)
    except ImageRefused as exc:
        raise ValueError(str(exc)) from None
    category = refused_literal(origin)
    if category is not None:
        raise ValueError(f"{origin.host} is a {category} address; images are not fetched from there")
    return url


class PredictContext(BaseModel):
    """The annotator's regions in an interactive request (``service.label_studio.tasks`` reads them)."""

    model_config = ConfigDict(extra="ignore")
    result: list[dict[str, Any]] | None = None


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    context: PredictContext | None = None


MAX_TASKS = 1000
"""Tasks one ``/predict`` call may carry (more: 422, before any task is read). Label Studio sends all
the tasks selected for "Retrieve predictions" in one call, and one call predicts far fewer than this
in its 100 s (the rest are answered "left for the next call")."""


class PredictIn(BaseModel):
    """``POST /predict``: the selected tasks (batch), or one task and the annotator's ``context``."""

    model_config = ConfigDict(extra="ignore")
    tasks: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_TASKS)
    project: str = ""
    label_config: str | None = None
    params: PredictParams = Field(default_factory=PredictParams)


TASK_FIELDS = ("id", "project", "data")
"""What the backend reads of a task. Label Studio also sends each task's annotations and predictions
(brush masks: often most of the body), which ``parse_predict`` skips."""
MAX_DEPTH = 32
"""Deepest nesting of a ``/predict`` body (Label Studio's, predictions included, nest about 8 deep)."""
MAX_KEPT_VALUES = 200_000
"""JSON values of the tasks' ids, projects and data and of the context that a body may hold (1000
tasks of a caption and 64 phrases hold about 70 000)."""

_OPEN, _CLOSE = ("start_map", "start_array"), ("end_map", "end_array")
_SKIPPED = object()  # stands for an array or object where a scalar belongs: fails validation as they do


class _Events:
    """ijson's events of a body (without the paths ``ijson.parse`` builds, which cost memory growing
    with the square of the nesting), with the depth checked and the values kept counted."""

    def __init__(self, raw: bytes) -> None:
        self._events = ijson.basic_parse(io.BytesIO(raw), use_float=True)
        self.depth, self.kept = 0, 0

    def __iter__(self) -> _Events:
        return self

    def __next__(self) -> tuple[str, Any]:
        event, value = next(self._events)
        if event in _OPEN:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise TaskInvalid(f"the body nests deeper than {MAX_DEPTH} levels")
        elif event in _CLOSE:
            self.depth -= 1
        return event, value

    def keep(self) -> None:
        self.kept += 1
        if self.kept > MAX_KEPT_VALUES:
            raise TaskInvalid(
                f"the tasks' data hold more than {MAX_KEPT_VALUES} values: send fewer tasks at a time"
            )


_Reader = Callable[[_Events, str, Any], Any]


def parse_predict(raw: bytes) -> PredictIn:
    """``POST /predict``'s body, streamed: only what the backend reads is built (of each task
    ``TASK_FIELDS``; of ``params`` the ``context``), at most ``MAX_KEPT_VALUES`` values of it, nested at
    most ``MAX_DEPTH`` deep, and parsing stops at task ``MAX_TASKS`` + 1. Parsed whole, a body costs 15
    (integer arrays) to 50 (empty objects) times its size in memory.

    Raises ``ValidationError`` as ``PredictIn.model_validate_json`` would, ``TaskInvalid`` past a bound.
    """
    events = _Events(raw)
    params = {"context": _value}
    members = {"tasks": _tasks, "project": _scalar, "label_config": _scalar, "params": _members(params)}
    try:
        body = _members(members)(events, *next(events))
        if next(events, None) is not None:  # ijson itself raises on most data after the body
            raise ijson.IncompleteJSONError("data after the body")
    except ijson.JSONError as exc:
        raise _invalid("json_invalid", (), {"error": str(exc)}) from None
    return PredictIn.model_validate(body)


def _members(keep: Mapping[str, _Reader], *, drop_skipped: bool = False) -> _Reader:
    """A reader of a JSON object that keeps the members ``keep`` names, each read by its reader (and
    with ``drop_skipped`` leaves out a member whose reader skipped it)."""

    def read(events: _Events, event: str, value: Any) -> Any:
        if event != "start_map":
            return _scalar(events, event, value)
        out: dict[str, Any] = {}
        for event, key in events:
            if event == "end_map":
                return out
            event, value = next(events)
            if key not in keep:
                _skip(events, event)
            elif (member := keep[key](events, event, value)) is not _SKIPPED or not drop_skipped:
                out[key] = member
        raise ijson.IncompleteJSONError("the body ends inside an object")

    return read


def _tasks(events: _Events, event: str, value: Any) -> Any:
    if event != "start_array":
        return _scalar(events, event, value)
    tasks: list[Any] = []
    for event, value in events:
        if event == "end_array":
            return tasks
        if len(tasks) == MAX_TASKS:
            ctx = {"field_type": "List", "max_length": MAX_TASKS, "actual_length": MAX_TASKS + 1}
            raise _invalid("too_long", ("tasks",), ctx)
        tasks.append(_task(events, event, value))
    raise ijson.IncompleteJSONError("the body ends inside the tasks")


def _value(events: _Events, event: str, value: Any) -> Any:
    """The whole JSON value whose first event is (``event``, ``value``), counted against the budget."""
    builder = ijson.ObjectBuilder()
    start = events.depth - int(event in _OPEN)  # the depth around the value
    while True:
        if event not in _CLOSE and event != "map_key":
            events.keep()
        builder.event(event, value)
        if events.depth == start:
            return builder.value
        event, value = next(events)


def _scalar(events: _Events, event: str, value: Any) -> Any:
    """A string, number, boolean or null; an array or object is skipped (and fails validation)."""
    if event in _OPEN:
        _skip(events, event)
        return _SKIPPED
    events.keep()
    return value


def _skip(events: _Events, event: str) -> None:
    """Read past the JSON value whose first event is ``event``, building nothing."""
    start = events.depth - int(event in _OPEN)
    while events.depth > start:
        next(events)


# A task's id or project that is not a scalar is left out: the backend only shows or splits them.
_task = _members({"id": _scalar, "project": _scalar, "data": _value}, drop_skipped=True)


def _invalid(kind: str, loc: tuple[str, ...], ctx: dict[str, Any]) -> ValidationError:
    error = {"type": kind, "loc": loc, "input": None, "ctx": ctx}
    return ValidationError.from_exception_data("PredictIn", [error])  # type: ignore[list-item]


class ErrorOut(BaseModel):
    """An error answer: the service's message, or FastAPI's list of body validation errors."""

    detail: str | list[dict[str, Any]]


class Thresholds(BaseModel):
    """What counts as a region. Defaults: the settings; per backend: Label Studio's ``extra_params``.

    ``mask_level``: a mask keeps the image patches whose phrase heatmap is at least this fraction of
    the heatmap's maximum. ``min_token_score``: a drawn box highlights the caption tokens whose box
    score is at least this fraction of the best token's score.
    """

    model_config = ConfigDict(extra="forbid")
    mask_level: float = Field(gt=0, le=1, allow_inf_nan=False)
    min_token_score: float = Field(ge=0, le=1, allow_inf_nan=False)

    @field_validator("mask_level", "min_token_score", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        """pydantic would read ``true`` as 1.0."""
        if isinstance(value, bool):
            raise ValueError("Input should be a number, not a boolean")
        return value

    def updated(self, extra_params: dict[str, Any] | None) -> Thresholds:
        """These thresholds with the ones given in ``extra_params`` (other keys there are not ours)."""
        given = {k: v for k, v in (extra_params or {}).items() if k in type(self).model_fields}
        try:
            return Thresholds(**{**self.model_dump(), **given})
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise TaskInvalid(
                f"extra_params: {problems} (mask_level in (0, 1], min_token_score in [0, 1])"
            ) from None

    def given(self, extra_params: dict[str, Any] | None) -> dict[str, float]:
        """The thresholds ``extra_params`` sets, validated (``TaskInvalid`` as ``updated`` raises)."""
        updated = self.updated(extra_params)
        return {k: getattr(updated, k) for k in type(self).model_fields if k in (extra_params or {})}
