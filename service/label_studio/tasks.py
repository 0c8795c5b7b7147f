"""Label Studio tasks -> what to explain: the caption, the phrases' spans or the annotator's span or box.

A batch call explains each task's phrases (``data.phrases``: strings found in the caption, or
``[start, end]`` character offsets; none: the whole caption); an interactive call explains the span
or box the annotator drew (``params.context``). Reading a task grows with its caption and phrases, so
callers run ``read_task`` in a worker thread, after the caption length limit and with at most
``EXCLIP_MAX_SELECTIONS`` phrases searched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.errors import RequestInvalid
from service.jobs import Job
from service.label_studio.config import LabelConfig
from service.label_studio.errors import TaskInvalid
from service.label_studio.protocol import PredictContext

PHRASES_KEY = "phrases"
"""Task data field with the phrases: strings found in the caption, or [start, end] character offsets."""
SPAN_KEYS = ("start", "end")
BOX_KEYS = ("x", "y", "width", "height")


@dataclass(frozen=True)
class Context:
    """The annotator's input in an interactive request: a caption span or an image box (percent)."""

    span: tuple[int, int] | None = None  # character offsets (code points), as Label Studio gives them
    box: tuple[float, float, float, float] | None = None  # x, y, width, height in percent


def _offset(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TaskInvalid(f"{where} must be an integer character offset, got {str(value)[:40]!r}")
    return value


def _percent(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TaskInvalid(
            f"{where} is non-numeric or not finite ({str(value)[:40]!r}); coordinates are numbers, in "
            "percent of the image"
        )
    return float(value)


def parse_context(context: PredictContext | Mapping[str, Any] | None, config: LabelConfig) -> Context | None:
    """The first span on the Text or box on the Image in ``context.result``; None for a batch call.

    Types are strict: offsets are integers, coordinates finite numbers (``TaskInvalid`` names the field).
    """
    if isinstance(context, Mapping):
        context = PredictContext.model_validate(context)
    if context is None or not context.result:
        return None
    for i, item in enumerate(context.result):
        value = item.get("value")
        if not isinstance(value, dict):
            continue
        where = f"params.context.result[{i}].value"
        if item.get("to_name") == config.text_name and all(k in value for k in SPAN_KEYS):
            start, end = (_offset(value[k], f"{where}.{k}") for k in SPAN_KEYS)
            return Context(span=(start, end))
        if item.get("to_name") == config.image_name and all(k in value for k in BOX_KEYS):
            x, y, w, h = (_percent(value[k], f"{where}.{k}") for k in BOX_KEYS)
            return Context(box=(x, y, w, h))
    raise TaskInvalid(
        f'the context has no span on <Text name="{config.text_name}"> and no rectangle on '
        f'<Image name="{config.image_name}">; draw one of those'
    )


@dataclass
class TaskWork:
    """One task on its way through: inputs, the job, then the prediction or the reason there is none."""

    task: dict[str, Any]
    caption: str = ""
    spans: list[tuple[int, int]] = field(default_factory=list)  # character offsets into the caption
    box_pct: tuple[float, float, float, float] | None = None
    interactive: bool = False
    image_ref: Any = None
    image: bytes | None = None
    phrases_cut: bool = False  # more phrases than EXCLIP_MAX_SELECTIONS: the first ones are explained
    job: Job | None = None
    prediction: str | None = None  # encoded as JSON once, as it is measured against the answer's limit
    error: str | None = None

    @property
    def task_id(self) -> Any:
        return self.task.get("id")

    def named_error(self) -> str:
        prefix = f"task {self.task_id}: "
        return self.error if self.error and self.error.startswith(prefix) else f"{prefix}{self.error}"


def caption_of(task: dict[str, Any], config: LabelConfig, max_chars: int) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskInvalid(f"task {task.get('id')}: data must be an object")
    caption = data.get(config.text_key)
    if isinstance(caption, str) and len(caption) > max_chars:  # checked before any work on the caption
        raise TaskInvalid(
            f"task {task.get('id')}: data.{config.text_key} has {len(caption)} characters; the limit is "
            f"{max_chars} (EXCLIP_MAX_CAPTION_CHARS): shorten the caption"
        )
    if not isinstance(caption, str) or not caption.strip():
        raise TaskInvalid(
            f"task {task.get('id')}: data.{config.text_key} must be the caption (a non-empty string)"
        )
    return caption


def checked_span(caption: str, start: int, end: int) -> tuple[int, int]:
    if not 0 <= start < end <= len(caption):
        raise TaskInvalid(
            f"span [{start}, {end}] does not fit the caption: need 0 <= start < end <= "
            f"{len(caption)} (characters, an emoji counts one)"
        )
    return start, end


def find(phrase: str, caption: str) -> re.Match | None:
    """The first match: as a whole word if possible (so "a" is not the "a" in "cat"), exact case first."""
    if len(phrase) > len(caption):  # a match has the phrase's length; no pattern to compile
        return None
    escaped = re.escape(phrase)
    for pattern, flags in (
        (rf"(?<!\w){escaped}(?!\w)", 0),
        (rf"(?<!\w){escaped}(?!\w)", re.I),
        (escaped, 0),
        (escaped, re.I),
    ):
        found = re.search(pattern, caption, flags)
        if found:
            return found
    return None


def phrase_spans(caption: str, phrases: Any, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` phrases of a task as Python spans (no span twice); the whole caption without
    phrases. Phrases past the limit are not searched."""
    if phrases is None or phrases == []:
        return [(0, len(caption))]
    if not isinstance(phrases, list):
        raise TaskInvalid(f"data.{PHRASES_KEY} must be a list of strings or [start, end] pairs")
    spans: list[tuple[int, int]] = []
    for phrase in phrases[:limit]:
        if isinstance(phrase, str):
            found = find(phrase, caption)
            if not phrase.strip() or found is None:
                raise TaskInvalid(f"phrase {phrase[:80]!r} is not in the caption {caption[:80]!r}")
            span = found.span()
        elif (
            isinstance(phrase, list)
            and len(phrase) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in phrase)
        ):
            span = checked_span(caption, *phrase)
        else:
            raise TaskInvalid(f"phrase {str(phrase)[:80]} is neither a string nor a [start, end] pair")
        if span not in spans:
            spans.append(span)
    return spans


def read_task(
    work: TaskWork, config: LabelConfig, context: Context | None, *, max_selections: int, max_chars: int
) -> None:
    """The caption and the phrases' spans, or the annotator's span or box; ``work.error`` if bad.

    Its work grows with the caption and the phrases: call it in a worker thread.
    """
    try:
        work.caption = caption_of(work.task, config, max_chars)
        if context is None:
            phrases = work.task["data"].get(PHRASES_KEY)
            work.spans = phrase_spans(work.caption, phrases, max_selections)
            work.phrases_cut = isinstance(phrases, list) and len(phrases) > max_selections
        elif context.span is not None:
            work.spans = [checked_span(work.caption, *context.span)]
        else:
            work.box_pct = context.box
        work.interactive = context is not None
        work.image_ref = work.task["data"].get(config.image_key)
    except RequestInvalid as exc:
        work.error = str(exc)
