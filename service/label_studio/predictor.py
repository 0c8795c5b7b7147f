"""Tasks -> explanation jobs on the queue -> Label Studio predictions.

The API holds no model: each task becomes one job (its image, its caption, one selection per phrase
or the annotator's span/box) that the workers compute, batched, exactly like ``POST /jobs``. A
``/predict`` call carries every selected task and Label Studio waits at most 100 s for the answer,
so the tasks go in chunks of ``EXCLIP_MAX_BATCH`` (one engine call each) and stop when the next
chunk would not fit in ``EXCLIP_LABEL_STUDIO_BUDGET_S``; the log says so. A chunk's tasks are read
(caption, phrase search) when its turn comes, in a worker thread, after the caption length limit and
with at most ``EXCLIP_MAX_SELECTIONS`` phrases each, so neither a long batch nor a costly task holds
the event loop. Tasks left out or failed get an entry without ``result``: Label Studio stores no
prediction for them, so running "Retrieve predictions" again picks them up; the log sums them up in
one line per call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from attribution.errors import InvalidSelection
from attribution.selections import Box, Selection, Span
from service.catalog import ModelInfo, default_model, served_models
from service.errors import QueueFull, RequestInvalid
from service.jobs import CaptionRequest, Job, JobStatus
from service.label_studio import results
from service.label_studio.config import LabelConfig, parse_label_config
from service.label_studio.errors import ImageRefused, LabelConfigInvalid, TaskInvalid
from service.label_studio.fetch import ImageFetcher
from service.label_studio.projects import ProjectSetup
from service.label_studio.protocol import PredictIn, Thresholds
from service.queue import JobQueue
from service.schemas import ExplainInput, ExplainOptions
from service.settings import Settings
from service.validation import build_job, image_size

log = logging.getLogger("exclip.label_studio")

LOGGED_EXAMPLES = 3
"""Tasks named in the one warning a call logs about the tasks without a prediction."""
PHRASES_KEY = "phrases"
"""Task data field with the phrases: strings found in the caption, or [start, end] character offsets."""
BOX_KEYS = ("x", "y", "width", "height")


def model_version(name: str, pretrained: str | None) -> str:
    """``name/weights``: changes when the served weights change, so Label Studio predicts again."""
    weights = PurePath(pretrained).name if pretrained else "random"
    return f"{name}/{weights}"


def settings_model_version(settings: Settings) -> str:
    return model_version(settings.model, settings.pretrained)


def default_thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        mask_level=settings.label_studio_mask_level, min_token_score=settings.label_studio_min_token_score
    )


@dataclass(frozen=True)
class Context:
    """The annotator's input in an interactive request: a caption span or an image box (percent)."""

    span: tuple[int, int] | None = None  # character offsets (code points), as Label Studio gives them
    box: tuple[float, float, float, float] | None = None  # x, y, width, height in percent


def parse_context(context: dict[str, Any] | None, config: LabelConfig) -> Context | None:
    """The first span on the Text or box on the Image in ``context["result"]``; None for a batch call."""
    if not context or not context.get("result"):
        return None
    for item in context["result"]:
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            continue
        try:
            if item.get("to_name") == config.text_name and "start" in value and "end" in value:
                return Context(span=(int(value["start"]), int(value["end"])))
            if item.get("to_name") == config.image_name and all(k in value for k in BOX_KEYS):
                x, y, w, h = (float(value[k]) for k in BOX_KEYS)
                return Context(box=(x, y, w, h))
        except (TypeError, ValueError):
            raise TaskInvalid(f"context region {item.get('id')!r} has non-numeric coordinates") from None
    raise TaskInvalid(
        f'the context has no span on <Text name="{config.text_name}"> and no rectangle on '
        f'<Image name="{config.image_name}">; draw one of those'
    )


@dataclass
class _Work:
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


def _caption(task: dict[str, Any], config: LabelConfig, max_chars: int) -> str:
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


def _checked_span(caption: str, start: int, end: int) -> tuple[int, int]:
    if not 0 <= start < end <= len(caption):
        raise TaskInvalid(
            f"span [{start}, {end}] does not fit the caption: need 0 <= start < end <= "
            f"{len(caption)} (characters, an emoji counts one)"
        )
    return start, end


def _find(phrase: str, caption: str) -> re.Match | None:
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


def _phrase_spans(caption: str, phrases: Any, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` phrases of a task as Python spans (no span twice); the whole caption without
    phrases. Phrases past the limit are not searched."""
    if phrases is None or phrases == []:
        return [(0, len(caption))]
    if not isinstance(phrases, list):
        raise TaskInvalid(f"data.{PHRASES_KEY} must be a list of strings or [start, end] pairs")
    spans: list[tuple[int, int]] = []
    for phrase in phrases[:limit]:
        if isinstance(phrase, str):
            found = _find(phrase, caption)
            if not phrase.strip() or found is None:
                raise TaskInvalid(f"phrase {phrase[:80]!r} is not in the caption {caption[:80]!r}")
            span = found.span()
        elif (
            isinstance(phrase, list)
            and len(phrase) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in phrase)
        ):
            span = _checked_span(caption, *phrase)
        else:
            raise TaskInvalid(f"phrase {str(phrase)[:80]} is neither a string nor a [start, end] pair")
        if span not in spans:
            spans.append(span)
    return spans


def _leave_for_next_call(works: list[_Work], at: int, reason: str, detail: str) -> None:
    """Answer the tasks from ``at`` on without a prediction, so the next call predicts them."""
    log.warning(
        "label-studio: %d of %d task(s) left for the next call: %s; run 'Retrieve predictions' again "
        "for them",
        len(works) - at,
        len(works),
        detail,
    )
    for work in works[at:]:
        work.error = f"left for the next call ({reason})"


class Predictor:
    """Answers one ``/predict`` call; see the module docstring."""

    def __init__(
        self, queue: JobQueue, settings: Settings, owner: str | None, setup: ProjectSetup | None
    ) -> None:
        self.queue, self.settings, self.owner = queue, settings, owner
        self.setup = setup
        self.thresholds = default_thresholds(settings).updated(setup.thresholds if setup else None)

    def fetcher(self) -> ImageFetcher:
        """The Label Studio host and token: the settings' URL wins over what /setup said."""
        s, setup = self.settings, self.setup
        if s.label_studio_url:
            url, token = s.label_studio_url, s.label_studio_api_key or (setup.access_token if setup else None)
        elif setup and setup.hostname:
            url, token = setup.hostname, setup.access_token  # never send our own key to a host /setup named
        else:
            raise ImageRefused(
                "the Label Studio URL is unknown: set LABEL_STUDIO_URL or connect the backend "
                "from Label Studio (its /setup call tells it)",
                422,
            )
        return ImageFetcher(url, token, max_bytes=s.max_upload_bytes)

    async def predict(self, body: PredictIn) -> list[str]:
        """One JSON-encoded entry per task, in order: its prediction, or why it has none."""
        started = time.monotonic()
        if not body.label_config:
            raise LabelConfigInvalid("the request has no label_config")
        config = parse_label_config(body.label_config)
        context = parse_context(body.params.context, config)
        interactive = context is not None
        if interactive and len(body.tasks) != 1:
            raise TaskInvalid(f"an interactive request takes one task, not {len(body.tasks)}")
        served = served_models(await self.queue.workers())
        if not served:
            raise RequestInvalid("no worker is serving a model right now; retry in a few seconds", 503)
        name = default_model(served, self.settings)
        assert name is not None  # served is not empty
        info = served[name]
        version = model_version(info.name, info.pretrained)

        works = [_Work(task=task) for task in body.tasks]
        try:
            fetcher: ImageFetcher | RequestInvalid = self.fetcher()
        except RequestInvalid as exc:  # the tasks are still read: a bad one gets its own error
            fetcher = exc
        await self._run_chunks(works, fetcher, served, (config, context, version), started)
        self._raise_if_interactive(works, interactive)
        self._log_outcome(works, started)
        return [w.prediction or json.dumps({"model_version": version, "error": w.error}) for w in works]

    def _log_outcome(self, works: list[_Work], started: float) -> None:
        """One line for the call, one for the tasks without a prediction (a few named), one for the tasks
        whose phrases were cut: the log does not grow with the number of tasks."""
        missing = [w for w in works if w.prediction is None]
        log.info(
            "label-studio: %d of %d task(s) predicted in %.1f s",
            len(works) - len(missing),
            len(works),
            time.monotonic() - started,
        )
        if missing:
            examples = "; ".join(w.named_error()[:300] for w in missing[:LOGGED_EXAMPLES])
            log.warning("label-studio: no prediction for %d task(s), e.g. %s", len(missing), examples)
        cut = [w for w in works if w.phrases_cut]
        if cut:
            log.warning(
                "label-studio: %d task(s) have more than %d phrases, e.g. task %s; only the first %d of "
                "each are explained (EXCLIP_MAX_SELECTIONS)",
                len(cut),
                self.settings.max_selections,
                str(cut[0].task_id)[:100],
                self.settings.max_selections,
            )

    @staticmethod
    def _raise_if_interactive(works: list[_Work], interactive: bool) -> None:
        if interactive and works[0].error is not None:
            raise TaskInvalid(works[0].error)

    def _read_tasks(self, works: list[_Work], config: LabelConfig, context: Context | None) -> None:
        for work in works:
            self._read_task(work, config, context)

    def _read_task(self, work: _Work, config: LabelConfig, context: Context | None) -> None:
        """The caption and the phrases' spans, or the annotator's span or box; ``work.error`` if bad.

        Its work grows with the caption and the phrases: called in a worker thread.
        """
        limit = self.settings.max_selections
        try:
            work.caption = _caption(work.task, config, self.settings.max_caption_chars)
            if context is None:
                phrases = work.task["data"].get(PHRASES_KEY)
                work.spans = _phrase_spans(work.caption, phrases, limit)
                work.phrases_cut = isinstance(phrases, list) and len(phrases) > limit
            elif context.span is not None:
                work.spans = [_checked_span(work.caption, *context.span)]
            else:
                work.box_pct = context.box
            work.interactive = context is not None
            work.image_ref = work.task["data"].get(config.image_key)
        except RequestInvalid as exc:
            work.error = str(exc)

    async def _fetch_images(self, works: list[_Work], fetcher: ImageFetcher | RequestInvalid) -> None:
        if not works:
            return
        images: list[bytes | Exception]
        if isinstance(fetcher, RequestInvalid):  # the Label Studio URL is unknown
            images = [fetcher] * len(works)
        else:
            try:
                images = await fetcher.fetch_all([w.image_ref for w in works])
            except RequestInvalid as exc:  # the host itself is refused or cannot be resolved
                images = [exc] * len(works)
        for work, image in zip(works, images, strict=True):
            if isinstance(image, Exception):
                work.error = str(image)
            else:
                work.image = image

    async def _build_job(self, work: _Work, served: dict[str, ModelInfo]) -> None:
        name = default_model(served, self.settings)
        assert work.image is not None  # called only for works without an error: the image was fetched
        try:
            width, height = await run_in_threadpool(image_size, work.image, self.settings)
            if work.box_pct is not None:
                x, y, w, h = work.box_pct
                box = (x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100)
                selections: tuple[Selection, ...] = (Box(*box),)
            else:
                selections = tuple(Span(*span) for span in work.spans)
            caption = CaptionRequest(work.caption, selections)
            inp = ExplainInput(image=work.image, captions=[caption], options=ExplainOptions(model=name))
            size = (width, height)
            work.job = await run_in_threadpool(build_job, inp, served, self.settings, size, self.owner)
        except RequestInvalid as exc:
            work.error = f"task {work.task_id}: {exc}"
        except InvalidSelection as exc:  # a selection the library refused (e.g. a box with NaN)
            work.error = f"task {work.task_id}: caption 0: {exc}"  # as build_job words its refusals

    async def _run_chunks(
        self,
        works: list[_Work],
        fetcher: ImageFetcher | RequestInvalid,
        served: dict[str, ModelInfo],
        target: tuple[LabelConfig, Context | None, str],
        started: float,
    ) -> None:
        """Read, fetch, compute and convert chunk by chunk, stopping before a chunk that would overrun the
        budget. ``fetcher`` is an error instead when images cannot be fetched at all (no Label Studio
        URL): then every task that can be read gets that error.

        Only one chunk's images are held at a time, so memory does not grow with the number of tasks,
        and tasks left for the next call are not even read.
        """
        config, context, version = target
        budget, size = self.settings.label_studio_budget_s, self.settings.max_batch
        max_bytes = self.settings.label_studio_max_answer_bytes
        slowest, answered = 0.0, 0
        for at in range(0, len(works), size):
            chunk, left = works[at : at + size], len(works) - at
            remaining = budget - (time.monotonic() - started)
            if at and slowest > remaining:
                detail = (
                    f"a chunk of {size} takes about {slowest:.0f} s and {remaining:.0f} s of the "
                    f"{budget:.0f} s budget remain (Label Studio waits 100 s)"
                )
                _leave_for_next_call(works, at, "time budget", detail)
                return
            if answered >= max_bytes:
                detail = (
                    f"the predictions so far hold {answered} bytes "
                    f"(EXCLIP_LABEL_STUDIO_MAX_ANSWER_BYTES {max_bytes})"
                )
                _leave_for_next_call(works, at, "answer size", detail)
                return
            chunk_started = time.monotonic()
            try:
                await run_in_threadpool(self._read_tasks, chunk, config, context)
                await self._fetch_images([w for w in chunk if w.error is None], fetcher)
                for work in chunk:
                    if work.error is None:
                        await self._build_job(work, served)
                await self._run_chunk(
                    [w for w in chunk if w.job is not None], served, budget - (time.monotonic() - started)
                )
                for work in chunk:
                    if work.error is None and work.job is not None and work.job.result is not None:
                        answered += await run_in_threadpool(self._convert, work, config, version)
            except QueueFull as exc:
                log.warning("label-studio: queue full, %d task(s) left for the next call", left)
                for work in works[at:]:
                    if work.error is None and (work.job is None or work.job.result is None):
                        work.error = f"queue full: {exc}"
                return
            finally:
                for work in chunk:
                    work.image = None
            slowest = max(slowest, time.monotonic() - chunk_started)

    async def _run_chunk(self, chunk: list[_Work], served: dict[str, ModelInfo], timeout_s: float) -> None:
        jobs: list[Job] = []
        for work in chunk:
            assert work.job is not None and work.image is not None  # only works with a built job come here
            await self.queue.enqueue(
                work.job, work.image, max_depth=self.settings.max_queue, depth_models=list(served)
            )
            jobs.append(work.job)
        finished = await asyncio.gather(*(self.queue.wait_finished(j.id, timeout_s) for j in jobs))
        for work, job in zip(chunk, finished, strict=True):
            if job is None:
                work.error = "the job expired"
            elif job.status is JobStatus.DONE:
                work.job = job
            elif job.status is JobStatus.FAILED:
                work.error = f"task {work.task_id}: {(job.error or {}).get('message', 'the job failed')}"
            else:
                await self.queue.cancel(job.id)  # a queued job is dropped; a running one finishes unread
                work.error = f"task {work.task_id}: not finished within the time budget"

    def _convert(self, work: _Work, config: LabelConfig, version: str) -> int:
        """Set the task's prediction, encoded as JSON; its size in bytes."""
        work.prediction = json.dumps(self._prediction(work, config, version))
        return len(work.prediction)

    def _prediction(self, work: _Work, config: LabelConfig, version: str) -> dict[str, Any]:
        assert work.job is not None and work.job.result is not None  # called only for finished jobs
        caption = work.job.result["captions"][0]
        image, regions = caption["image"], []
        for selection in caption["selections"]:
            if selection["kind"] == "span":
                heatmap = np.asarray(selection["heatmap"])
                mask = results.heatmap_mask(heatmap, image, self.thresholds.mask_level)
                if not work.interactive:  # a batch names each phrase; an annotator's span is already there
                    span = results.text_region(config, work.caption, selection["start"], selection["end"])
                    regions += [span] if span else []
                regions += results.image_regions(config, mask, image)
            else:
                regions += results.token_regions(
                    config,
                    work.caption,
                    caption["tokens"],
                    selection["token_scores"],
                    self.thresholds.min_token_score,
                )
        return {"result": regions, "score": float(caption["score"]), "model_version": version}
