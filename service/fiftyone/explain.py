"""``explain_samples``: a FiftyOne dataset or view, explained sample by sample by the service.

Samples go to the service through the project's ``AsyncClient``, ``concurrency`` at a time; each
result is written to its sample as soon as it arrives (fields: ``service.fiftyone.fields``), so a run
that stops keeps what it wrote, and running it again skips the samples whose ``{prefix}_request``
matches and that have no error (``overwrite=True`` computes them again). Memory holds the samples in
flight and one page of sample values, whatever the dataset's size.

A sample that cannot be explained (missing or unreadable file, no or too long caption, a phrase not
in the caption, a request the service refuses, a job that fails) gets ``{prefix}_error`` and the run
goes on. A service that cannot be reached or stays busy stops the run (``ServiceUnavailable``); what
was written stays. Arguments that make no sense, and field names taken by fields of another type,
raise ``ValueError`` before anything is written.

FiftyOne is used from one thread only (its own executor), the HTTP calls from the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fiftyone as fo
import fiftyone.core.utils as fou
from bson import ObjectId
from fiftyone import ViewField as F
from PIL import Image, UnidentifiedImageError

from attribution.selections import Span
from service.client import AsyncClient, ConnectionFailed, ServiceBusy
from service.client.errors import ClientError
from service.client.flows import Options
from service.fiftyone.fields import Fields, check_schema, declare, failure_values, result_values
from service.fiftyone.labels import phrase_labels
from service.fiftyone.limits import MAX_CONCURRENCY, MAX_IMAGE_BYTES
from service.fiftyone.phrases import DEFAULT_MAX_PHRASES, PhraseSource, Phrasing, SampleInvalid

ERRORS_KEPT = 5  # errors quoted in the summary
T = TypeVar("T")
Progress = Callable[[int, int], None]  # (samples finished, samples in all)


class ServiceUnavailable(RuntimeError):
    """The service could not be reached or stayed busy: the run stopped; run it again to resume."""


@dataclass
class RunSummary:
    """What a run did: samples in the view, explained now, skipped (already done), failed, and how many
    samples had more phrases than ``max_phrases`` (only the first were explained)."""

    total: int = 0
    explained: int = 0
    skipped: int = 0
    failed: int = 0
    phrases_cut: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.explained + self.skipped + self.failed


@dataclass(frozen=True)
class Work:
    """One sample to explain (its request key decides whether a later run skips it)."""

    sample_id: str
    filepath: str
    phrasing: Phrasing | None
    request: str
    invalid: str | None = None


def explain_samples(
    samples: fo.core.collections.SampleCollection,
    *,
    url: str,
    prefix: str = "exclip",
    caption_field: str | None = None,
    caption: str | None = None,
    phrases_field: str | None = None,
    phrases: Sequence[str] | None = None,
    label_field: str | None = None,
    max_phrases: int = DEFAULT_MAX_PHRASES,
    model: str | None = None,
    text_layer: int | None = None,
    image_layer: int | None = None,
    steps: int | None = None,
    precision: str | None = None,
    quadrature: str | None = None,
    tolerance: float | None = None,
    concurrency: int = 4,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    api_key: str | None = None,
    overwrite: bool = False,
    progress: bool | Progress = True,
    wait_s: float = 600.0,
) -> RunSummary:
    """Explain every image sample of ``samples`` and write the results (see the module docstring).

    Captions and phrases (``service.fiftyone.phrases``): ``caption_field`` or one ``caption`` for all,
    with phrases from ``phrases_field``, a fixed ``phrases`` list or ``label_field``'s labels (none: the
    whole caption). The model options are the service's (None: its default). ``max_image_bytes``: larger
    files are an error of their sample, unread. ``progress``: a progress bar (True), none (False) or a
    callable ``(finished, total)``.
    """
    source = PhraseSource(
        caption_field=caption_field,
        caption=caption,
        phrases_field=phrases_field,
        phrases=None if phrases is None else tuple(phrases),
        label_field=label_field,
        max_phrases=max_phrases,
    )
    source.check()
    if not prefix.isidentifier():
        raise ValueError(f"prefix must be a plain identifier (letters, digits, _), got {prefix!r}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    if samples.media_type != "image":
        raise ValueError(f"only image samples can be explained, this collection holds {samples.media_type}")
    schema = samples.get_field_schema()
    missing = [name for name in source.read_fields if name not in schema]
    if missing:
        raise ValueError(f"the samples have no field {missing[0]!r}")
    fields = Fields(prefix, max_phrases)
    check_schema(schema, fields, source.read_fields)
    options = Options(
        model=model,
        text_layer=text_layer,
        image_layer=image_layer,
        steps=steps,
        precision=precision,
        quadrature=quadrature,
        tolerance=tolerance,
    )
    if max_image_bytes < 1:
        raise ValueError(f"max_image_bytes must be positive, got {max_image_bytes}")
    run = _Run(samples, source, fields, options, concurrency, overwrite, max_image_bytes)
    client = AsyncClient(url, api_key=api_key, wait_s=wait_s)
    return _run_blocking(run.run(client, progress))


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, in a thread of its own when this thread already runs a loop (a notebook, the
    FiftyOne App's operator executor)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("value", asyncio.run(coroutine)))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=target, name="exclip-explain")
    thread.start()
    thread.join()
    kind, value = outcome[0]
    if kind == "error":
        raise value
    result: T = value
    return result


def request_key(phrasing: Phrasing, model: str, options: Options) -> str:
    """What a sample's result answers: the same key on a later run means nothing needs computing."""
    asked = {k: v for k, v in options.items() if v is not None and k != "model"}
    return json.dumps(
        {"model": model, "caption": phrasing.caption, "spans": phrasing.spans, "options": asked},
        sort_keys=True,
    )


def check_image(data: bytes) -> None:
    """``SampleInvalid`` unless PIL can read the image (the service would refuse it, less clearly)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleInvalid(f"the file is not an image PIL can read ({exc})") from exc


def read_image(path: str, max_bytes: int) -> bytes:
    """The file's bytes, once its size is known to be within ``max_bytes`` (memory stays bounded)."""
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise SampleInvalid(
                f"the image file has {size} bytes; the limit is max_image_bytes={max_bytes} (the service's "
                "EXCLIP_MAX_UPLOAD_BYTES counts the base64 body, a third larger)"
            )
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SampleInvalid(f"cannot read the image file: {exc}") from exc
    check_image(data)
    return data


class _Run:
    def __init__(
        self,
        samples: fo.core.collections.SampleCollection,
        source: PhraseSource,
        fields: Fields,
        options: Options,
        concurrency: int,
        overwrite: bool,
        max_image_bytes: int,
    ) -> None:
        self.samples, self.source, self.fields = samples, source, fields
        self.options, self.concurrency, self.overwrite = options, concurrency, overwrite
        self.page_size = max(64, 4 * concurrency)
        self.max_image_bytes = max_image_bytes
        self.summary = RunSummary()
        self.model = ""
        self._fiftyone = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exclip-fiftyone")

    async def _fo(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._fiftyone, function, *args)

    async def run(self, client: AsyncClient, progress: bool | Progress) -> RunSummary:
        try:
            async with client:
                self.model = await self._served_model(client)
                self.summary.total = await self._fo(self.samples.count)
                dataset: fo.Dataset = self.samples._dataset  # the root dataset (a view's or itself)
                await self._fo(declare, dataset, self.fields)
                with _progress(progress, self.summary.total) as report:
                    await self._explain_all(client, dataset, report)
        finally:
            self._fiftyone.shutdown(wait=True)
        return self.summary

    async def _served_model(self, client: AsyncClient) -> str:
        try:
            served = await client.models()
        except (ConnectionFailed, ServiceBusy) as exc:
            raise ServiceUnavailable(f"the service does not answer: {exc}") from exc
        name = self.options.get("model") or served.default
        if name is None or name not in served.models:
            known = ", ".join(sorted(served.models)) or "none"
            raise ValueError(f"the service serves no model {name!r} (it serves: {known})")
        return name

    async def _explain_all(self, client: AsyncClient, dataset: fo.Dataset, report: Progress) -> None:
        queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=self.concurrency)

        async def produce() -> None:
            after: str | None = None
            while True:
                page, after = await self._fo(self._page, after)
                for work in page:
                    if work is None:
                        self.summary.skipped += 1
                        report(self.summary.finished, self.summary.total)
                    else:
                        await queue.put(work)
                if len(page) < self.page_size:
                    break
            for _ in range(self.concurrency):
                await queue.put(None)

        async def consume() -> None:
            while (work := await queue.get()) is not None:
                await self._explain_one(client, dataset, work)
                report(self.summary.finished, self.summary.total)

        tasks = [asyncio.ensure_future(produce())]
        tasks += [asyncio.ensure_future(consume()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed (the service is gone): the others stop, in-flight samples are not written
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _page(self, after: str | None) -> tuple[list[Work | None], str | None]:
        """The next page of samples in id order after id ``after``, as work (None: already done), and
        the page's last id. Keyed by id, not by position: a view that filters on the fields this run
        writes (say, the samples with an error) loses members as they are done, and no sample is
        skipped for it. Runs in the FiftyOne thread."""
        page = self.samples
        if after is not None:
            page = page.match(F("_id") > ObjectId(after))
        names = ["id", "filepath", *self.source.read_fields, self.fields.request, self.fields.error]
        columns = page.sort_by("_id").limit(self.page_size).values(names)
        out: list[Work | None] = []
        for row in zip(*columns, strict=True):
            values = dict(zip(names, row, strict=True))
            out.append(self._work(values))
        return out, (str(columns[0][-1]) if columns[0] else after)

    def _work(self, values: dict[str, Any]) -> Work | None:
        sample_id, filepath = str(values["id"]), str(values["filepath"])
        try:
            phrasing = self.source.phrasing(values)
        except SampleInvalid as exc:
            return Work(sample_id, filepath, None, json.dumps({"invalid": str(exc)}), invalid=str(exc))
        key = request_key(phrasing, self.model, self.options)
        done = values[self.fields.request] == key and values[self.fields.error] is None
        return None if done and not self.overwrite else Work(sample_id, filepath, phrasing, key)

    async def _explain_one(self, client: AsyncClient, dataset: fo.Dataset, work: Work) -> None:
        try:
            if work.phrasing is None:
                raise SampleInvalid(work.invalid or "invalid sample")
            image = await asyncio.to_thread(read_image, work.filepath, self.max_image_bytes)
            spans = [Span(start, end) for start, end in work.phrasing.spans]
            options = Options(**{**self.options, "model": self.model})
            job = await client.explain(image, [(work.phrasing.caption, spans)], **options)
            del image
            assert job.explanations is not None  # a done job carries its explanations
            labels = await asyncio.to_thread(phrase_labels, job.explanations[0])
        except (ConnectionFailed, ServiceBusy) as exc:
            raise ServiceUnavailable(
                f"the service stopped answering ({exc}); {self.summary.explained} sample(s) were "
                "written: run again to resume"
            ) from exc
        except (SampleInvalid, ClientError) as exc:
            await self._fo(
                self._write, dataset, work.sample_id, failure_values(self.fields, work.request, str(exc))
            )
            self.summary.failed += 1
            if len(self.summary.errors) < ERRORS_KEPT:
                self.summary.errors.append(f"{work.filepath}: {exc}")
            return
        explanation = job.explanations[0]
        summary = {
            "score": explanation.result.score,
            "completeness": vars(explanation.result.completeness),
            "caption": work.phrasing.caption,
            "request": work.request,
        }
        await self._fo(self._write, dataset, work.sample_id, result_values(self.fields, labels, summary))
        self.summary.explained += 1
        self.summary.phrases_cut += work.phrasing.cut > 0

    @staticmethod
    def _write(dataset: fo.Dataset, sample_id: str, values: dict[str, Any]) -> None:
        sample = dataset[sample_id]
        for name, value in values.items():
            sample[name] = value
        sample.save()


class _progress:
    """A FiftyOne progress bar (True), nothing (False), or the caller's callable, as a callable."""

    def __init__(self, progress: bool | Progress, total: int) -> None:
        self.progress, self.total = progress, total
        self.bar: Any = None

    def __enter__(self) -> Progress:
        if callable(self.progress):
            return self.progress
        if self.progress:
            self.bar = fou.ProgressBar(total=self.total)
            self.bar.start()
            return lambda finished, total: self.bar.set_iteration(finished)
        return lambda finished, total: None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
