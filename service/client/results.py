"""The typed views of the service's answers: a ``Job`` (its result as ``Explanation`` objects) and the
served models. Decoding only; what to send is in service.client.flows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attribution.pipeline import Explanation
from service.catalog import ModelInfo
from service.jobs import JobStatus


@dataclass(frozen=True)
class Job:
    """A job as ``GET /jobs/{id}`` shows it; a done job's ``explanations`` (one per caption) and
    ``timings`` (``queued_ms``, ``compute_ms`` per caption) are decoded, ``raw`` is the JSON as received."""

    id: str
    status: JobStatus
    model: str
    created_at: float
    explanations: list[Explanation] | None = None
    timings: list[dict[str, float]] | None = None
    error: dict[str, str] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Job:
        """The Job JSON of the contract; either matrix format decodes to the same tensors."""
        result = body.get("result")
        captions = result["captions"] if result else None
        return cls(
            id=body["id"],
            status=JobStatus(body["status"]),
            model=body["model"],
            created_at=float(body["created_at"]),
            explanations=None if captions is None else [Explanation.from_dict(c) for c in captions],
            timings=None if captions is None else [dict(c.get("timings", {})) for c in captions],
            error=body.get("error"),
            raw=body,
        )


def is_job(body: Any) -> bool:
    """Whether an answer's JSON is a job (a failed ``POST /explain`` answers its job with the error)."""
    return isinstance(body, dict) and {"id", "status", "model", "created_at"} <= body.keys()


@dataclass(frozen=True)
class ServedModel:
    """One model the workers hold: its description and the accepted range of every option."""

    info: ModelInfo
    options: dict[str, Any]


@dataclass(frozen=True)
class ServedModels:
    """``GET /models``: the models by name and the one a request without ``model`` gets."""

    models: dict[str, ServedModel]
    default: str | None

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ServedModels:
        models = {
            m["name"]: ServedModel(ModelInfo.model_validate(m), dict(m.get("options", {})))
            for m in body["models"]
        }
        return cls(models=models, default=body.get("default"))
