"""The job record: what the API stores for each request and the worker updates.

A job goes ``queued → running → done | failed``, or ``queued → cancelled``. The record is stored
field-by-field (a Redis hash, or a dict in the in-memory queue) so a status change does not rewrite
the result, and ``to_public()`` gives the Job JSON of the contract.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class Job:
    """One explanation request: one image, one or more captions, one set of options.

    ``request`` is the validated, normalised request without the image (layers resolved to numbers):
    ``{"model", "text_layer", "image_layer", "steps", "precision", "format", "captions": [{"text",
    "selections": [{"kind": "span"|"tokens"|"box", ...}]}]}``.
    """

    model: str
    request: dict[str, Any]
    owner: str | None = None  # sha256 of the API key that created the job; never the key itself
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    deliveries: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can be computed in one engine call."""
        r = self.request
        return f"{r['model']}|{r['text_layer']}|{r['image_layer']}|{r['steps']}|{r['precision']}"

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

    # Flat string fields, as a Redis hash stores them. JSON for the nested ones.
    _JSON_FIELDS = ("request", "result", "error")

    def to_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            if name in self._JSON_FIELDS:
                out[name] = json.dumps(value, separators=(",", ":"))
            elif isinstance(value, JobStatus):
                out[name] = value.value
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        def opt_float(name: str) -> float | None:
            return float(fields[name]) if name in fields else None

        def opt_json(name: str) -> Any:
            return json.loads(fields[name]) if name in fields else None

        return cls(
            id=fields["id"],
            model=fields["model"],
            request=json.loads(fields["request"]),
            owner=fields.get("owner"),
            status=JobStatus(fields["status"]),
            created_at=float(fields["created_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            deliveries=int(fields.get("deliveries", 0)),
            result=opt_json("result"),
            error=opt_json("error"),
        )


def error_dict(exc: BaseException | str, kind: str | None = None) -> dict[str, str]:
    """The ``error`` member of a failed job."""
    if isinstance(exc, BaseException):
        return {"type": kind or type(exc).__name__, "message": str(exc) or repr(exc)}
    return {"type": kind or "Error", "message": exc}
