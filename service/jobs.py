"""The job record and its request: what the API stores for each request and the worker reads.

A job goes ``queued → running → done | failed``, or ``queued → cancelled``. The record is stored
field-by-field (a Redis hash, or a dict in the in-memory queue) so a status change does not rewrite
the result; ``to_fields``/``from_fields`` are its one serialisation and ``to_public()`` gives the Job
JSON of the contract. ``JobRequest`` is the validated request without the image, with its
``to_dict``/``from_dict`` beside it (as arq keeps ``JobDef`` with its serialisers).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypedDict

from attribution.pipeline import ExplainRequest
from attribution.selections import Selection, selection_from_dict
from service.errors import Fault


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class JobResult(TypedDict):
    """A done job's result: per caption, ``Explanation.to_dict()`` (its typed view) plus ``timings``."""

    captions: list[dict[str, Any]]


@dataclass(frozen=True)
class CaptionRequest:
    """A caption and its typed selections, as parsed from a form, a JSON body or a Label Studio task."""

    text: str
    selections: tuple[Selection, ...] = ()


@dataclass(frozen=True)
class JobRequest:
    """A validated request without its image: layers resolved to numbers, selections checked."""

    model: str
    text_layer: int
    image_layer: int
    steps: int
    precision: str
    format: str
    captions: tuple[CaptionRequest, ...]
    quadrature: str | None = None  # None: the engine's default rule (attribution.quadrature)
    tolerance: float | None = None
    text_reference: str | None = None  # None: the engine's default (attribution.explainer)

    @property
    def batch_key(self) -> tuple[str, int, int, int, str, str, str, str]:
        """Requests with equal keys can be computed in one engine call."""
        integration = (str(self.quadrature), str(self.tolerance), str(self.text_reference))
        return (self.model, self.text_layer, self.image_layer, self.steps, self.precision, *integration)

    @property
    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of ``attribution.pipeline.explain_requests``."""
        return {
            "text_layer": self.text_layer,
            "image_layer": self.image_layer,
            "steps": self.steps,
            "precision": self.precision,
            "quadrature": self.quadrature,
            "tolerance": self.tolerance,
        } | ({} if self.text_reference is None else {"text_reference": self.text_reference})

    def explain_request(self, image: Any) -> ExplainRequest:
        return ExplainRequest(
            image=image,
            captions=[c.text for c in self.captions],
            selections=[list(c.selections) for c in self.captions],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text_layer": self.text_layer,
            "image_layer": self.image_layer,
            "steps": self.steps,
            "precision": self.precision,
            "quadrature": self.quadrature,
            "tolerance": self.tolerance,
            "text_reference": self.text_reference,
            "format": self.format,
            "captions": [
                {"text": c.text, "selections": [s.to_dict() for s in c.selections]} for c in self.captions
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRequest:
        captions = tuple(
            CaptionRequest(c["text"], tuple(selection_from_dict(s) for s in c["selections"]))
            for c in d["captions"]
        )
        return cls(
            model=d["model"],
            text_layer=int(d["text_layer"]),
            image_layer=int(d["image_layer"]),
            steps=int(d["steps"]),
            precision=d["precision"],
            format=d["format"],
            captions=captions,
            quadrature=d.get("quadrature"),  # absent in jobs queued before the option existed
            tolerance=None if d.get("tolerance") is None else float(d["tolerance"]),
            text_reference=d.get("text_reference"),  # absent in jobs queued before the option existed
        )


@dataclass
class Job:
    """One explanation request: one image, one or more captions, one set of options."""

    request: JobRequest
    owner: str | None = None  # HMAC of the API key that created the job; never the key itself
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    deliveries: int = 0
    result: JobResult | None = None
    error: dict[str, str] | None = None
    fault: Fault | None = None  # set by the worker with ``error``: whose fault the failure is
    evicted: bool = False  # the result was dropped to keep stored bytes within their budget

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def batch_key(self) -> tuple[str, int, int, int, str, str, str, str]:
        return self.request.batch_key

    @property
    def batch_tag(self) -> str:
        """``batch_key`` as one string, carried by the job's stream entry."""
        return "|".join(str(part) for part in self.batch_key)

    def fail(self, message: str, kind: str, fault: Fault) -> None:
        """Record a failure (the worker's word on whose fault it is goes with it)."""
        self.error, self.fault = {"type": kind, "message": message}, fault

    def to_public(self) -> dict[str, Any]:
        """The Job JSON of the contract (no owner, no internal request copy)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": self.created_at,
            "model": self.model,
            "result": self.result,
            "error": self.error,
        }

    OUTCOME_FIELDS = ("status", "result", "error", "fault", "finished_at", "evicted")
    """The fields a worker writes when a job finishes (the rest is the API's)."""

    def to_fields(self) -> dict[str, str]:
        """Flat string fields, as a Redis hash stores them; None is left out, nested values are JSON."""
        values: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "request": self.request.to_dict(),
            "owner": self.owner,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "deliveries": self.deliveries,
            "result": self.result,
            "error": self.error,
            "fault": self.fault.value if self.fault else None,
            "evicted": "1" if self.evicted else None,
        }
        out: dict[str, str] = {}
        for name, value in values.items():
            if value is None:
                continue
            out[name] = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        def opt_float(name: str) -> float | None:
            return float(fields[name]) if name in fields else None

        def opt_json(name: str) -> Any:
            return json.loads(fields[name]) if name in fields else None

        return cls(
            id=fields["id"],
            request=JobRequest.from_dict(json.loads(fields["request"])),
            owner=fields.get("owner"),
            status=JobStatus(fields["status"]),
            created_at=float(fields["created_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            deliveries=int(fields.get("deliveries", 0)),
            result=opt_json("result"),
            error=opt_json("error"),
            fault=Fault(fields["fault"]) if "fault" in fields else None,
            evicted=fields.get("evicted") == "1",
        )
