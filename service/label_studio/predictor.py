"""A ``/predict`` call: tasks -> explanation jobs on the queue -> Label Studio predictions, in budget.

The API holds no model: each task becomes one job (its image, its caption, one selection per phrase
or the annotator's span/box) that the workers compute, batched, exactly like ``POST /jobs``. A
``/predict`` call carries every selected task and Label Studio waits at most 100 s for the answer,
so the tasks go in chunks of ``EXCLIP_MAX_BATCH`` (one engine call each) and stop when the next
chunk would not fit in ``EXCLIP_LABEL_STUDIO_BUDGET_S``; the log says so. The budget is also every
image download's deadline, waiting included (the first chunk's is at least ``FIRST_CHUNK_DOWNLOAD_S``).
A chunk's tasks are read (``service.label_studio.tasks``) when its turn comes, in a worker thread, so
neither a long batch nor a costly task holds the event loop. Tasks left out or failed get an entry
without ``result``: Label Studio stores no prediction for them, so running "Retrieve predictions"
again picks them up; the log sums them up in one line per call. A call that is cancelled (its client
left, the process stops) cancels the jobs it queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import PurePath
from typing import Any

from starlette.concurrency import run_in_threadpool

from attribution.errors import AttributionError
from attribution.pipeline import Explanation
from attribution.selections import Box, Selection, Span
from service.catalog import ModelInfo, default_model
from service.errors import QueueFull, RequestInvalid
from service.jobs import CaptionRequest, Job, JobStatus
from service.label_studio import results
from service.label_studio.config import LabelConfig, parse_label_config
from service.label_studio.errors import ImageRefused, LabelConfigInvalid, TaskInvalid
from service.label_studio.fetch import Downloads, ImageFetcher
from service.label_studio.projects import ProjectSetup
from service.label_studio.protocol import PredictIn, Thresholds
from service.label_studio.tasks import Context, TaskWork, parse_context, read_task
from service.queue import JobQueue
from service.served import ServedCache
from service.settings import Settings
from service.validation import ExplainCall, build_call_job, upload_size

log = logging.getLogger("exclip.label_studio")

LOGGED_EXAMPLES = 3
"""Tasks named in the one warning a call logs about the tasks without a prediction."""
FIRST_CHUNK_DOWNLOAD_S = 5.0
"""The first chunk always runs: its images may take this long to download even when the budget is
smaller (a budget under it is for tests; Label Studio's is 80 s)."""


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


def _leave_for_next_call(works: list[TaskWork], at: int, reason: str, detail: str) -> None:
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


def pixel_box(box_pct: tuple[float, float, float, float], size: tuple[int, int]) -> Box:
    """Label Studio's x, y, width, height in percent of the image -> x0, y0, x1, y1 in its pixels."""
    (x, y, w, h), (width, height) = box_pct, size
    return Box(x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100)


class Predictor:
    """Answers one ``/predict`` call; see the module docstring."""

    def __init__(
        self,
        queue: JobQueue,
        settings: Settings,
        owner: str | None,
        setup: ProjectSetup | None,
        downloads: Downloads | None = None,
    ) -> None:
        self.queue, self.settings, self.owner = queue, settings, owner
        self.setup, self.downloads = setup, downloads
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
        return ImageFetcher(url, token, max_bytes=s.max_upload_bytes, downloads=self.downloads)

    async def predict(self, body: PredictIn, serving: ServedCache) -> list[str]:
        """One JSON-encoded entry per task, in order: its prediction, or why it has none."""
        started = time.monotonic()
        if not body.label_config:
            raise LabelConfigInvalid("the request has no label_config")
        config = parse_label_config(body.label_config)
        context = parse_context(body.params.context, config)
        interactive = context is not None
        if interactive and len(body.tasks) != 1:
            raise TaskInvalid(f"an interactive request takes one task, not {len(body.tasks)}")
        served = await serving.required()
        name = default_model(served, self.settings)
        assert name is not None  # served is not empty
        info = served[name]
        version = model_version(info.name, info.pretrained)

        works = [TaskWork(task=task) for task in body.tasks]
        try:
            fetcher: ImageFetcher | RequestInvalid = self.fetcher()
        except RequestInvalid as exc:  # the tasks are still read: a bad one gets its own error
            fetcher = exc
        await self._run_chunks(works, fetcher, served, (config, context, version), started)
        self._raise_if_interactive(works, interactive)
        self._log_outcome(works, started)
        return [w.prediction or json.dumps({"model_version": version, "error": w.error}) for w in works]

    def _log_outcome(self, works: list[TaskWork], started: float) -> None:
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
    def _raise_if_interactive(works: list[TaskWork], interactive: bool) -> None:
        if interactive and works[0].error is not None:
            raise TaskInvalid(works[0].error)

    def _read_tasks(self, works: list[TaskWork], config: LabelConfig, context: Context | None) -> None:
        limits = {
            "max_selections": self.settings.max_selections,
            "max_chars": self.settings.max_caption_chars,
        }
        for work in works:
            read_task(work, config, context, **limits)

    async def _fetch_images(
        self, works: list[TaskWork], fetcher: ImageFetcher | RequestInvalid, deadline: float
    ) -> None:
        if not works:
            return
        images: list[bytes | Exception]
        if isinstance(fetcher, RequestInvalid):  # the Label Studio URL is unknown
            images = [fetcher] * len(works)
        else:
            try:
                images = await fetcher.fetch_all([w.image_ref for w in works], deadline=deadline)
            except RequestInvalid as exc:  # the host itself is refused or cannot be resolved
                images = [exc] * len(works)
        for work, image in zip(works, images, strict=True):
            if isinstance(image, Exception):
                work.error = str(image)
            else:
                work.image = image

    def _call(self, work: TaskWork, size: tuple[int, int], model: str | None) -> ExplainCall:
        """What the task asks, as the service's request: its caption and spans, or the annotator's box."""
        selections: tuple[Selection, ...]
        if work.box_pct is not None:
            selections = (pixel_box(work.box_pct, size),)
        else:
            selections = tuple(Span(start, end) for start, end in work.spans)
        return ExplainCall(captions=(CaptionRequest(work.caption, selections),), model=model)

    async def _build_job(self, work: TaskWork, served: dict[str, ModelInfo]) -> None:
        name = default_model(served, self.settings)
        assert work.image is not None  # called only for works without an error: the image was fetched
        try:
            size = await run_in_threadpool(upload_size, work.image, self.settings)
            call = self._call(work, size, name)
            work.job = await run_in_threadpool(build_call_job, call, served, self.settings, size, self.owner)
        except (RequestInvalid, AttributionError) as exc:  # AttributionError: e.g. an empty box
            work.error = f"task {work.task_id}: {exc}"

    async def _run_chunks(
        self,
        works: list[TaskWork],
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
        deadline = started + budget
        max_bytes = self.settings.label_studio_max_answer_bytes
        slowest, answered = 0.0, 0
        for at in range(0, len(works), size):
            chunk, left = works[at : at + size], len(works) - at
            remaining = deadline - time.monotonic()
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
                fetched_by = deadline if at else max(deadline, chunk_started + FIRST_CHUNK_DOWNLOAD_S)
                await self._fetch_images([w for w in chunk if w.error is None], fetcher, fetched_by)
                for work in chunk:
                    if work.error is None:
                        await self._build_job(work, served)
                await self._run_chunk(
                    [w for w in chunk if w.job is not None], served, deadline - time.monotonic()
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

    async def _run_chunk(self, chunk: list[TaskWork], served: dict[str, ModelInfo], timeout_s: float) -> None:
        jobs: list[Job] = []
        try:
            for work in chunk:
                assert work.job is not None and work.image is not None  # only works with a built job
                await self.queue.enqueue(
                    work.job, work.image, max_depth=self.settings.max_queue, depth_models=list(served)
                )
                jobs.append(work.job)
            finished = await asyncio.gather(*(self.queue.wait_finished(j.id, timeout_s) for j in jobs))
        except asyncio.CancelledError:  # nobody will read these jobs' results: queued ones are dropped
            await asyncio.gather(*(self.queue.cancel(j.id) for j in jobs), return_exceptions=True)
            raise
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

    def _convert(self, work: TaskWork, config: LabelConfig, version: str) -> int:
        """Set the task's prediction, encoded as JSON; its size in bytes."""
        work.prediction = json.dumps(self._prediction(work, config, version))
        return len(work.prediction)

    def _prediction(self, work: TaskWork, config: LabelConfig, version: str) -> dict[str, Any]:
        assert work.job is not None and work.job.result is not None  # called only for finished jobs
        explanation = Explanation.from_dict(work.job.result["captions"][0])
        image, regions = explanation.geometry, []
        for selected in explanation.selections:
            if selected.heatmap is not None:  # a span: the image regions it points at
                mask = results.heatmap_mask(selected.heatmap.numpy(), image, self.thresholds.mask_level)
                span = selected.selection
                if not work.interactive and isinstance(span, Span):  # an annotator's span is already there
                    region = results.text_region(config, work.caption, span.start, span.end)
                    regions += [region] if region else []
                regions += results.image_regions(config, mask, image)
            else:  # a box: the caption tokens it points at
                assert selected.token_scores is not None  # a box's result always carries token scores
                regions += results.token_regions(
                    config,
                    work.caption,
                    explanation.tokens,
                    selected.token_scores.tolist(),
                    self.thresholds.min_token_score,
                )
        return {"result": regions, "score": float(explanation.result.score), "model_version": version}
