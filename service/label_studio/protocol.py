"""The ML backend protocol's request bodies (Label Studio 1.23) and the backend's thresholds.

Label Studio sends more fields than these (task metadata, credentials); unknown ones are ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.label_studio.errors import TaskInvalid


class SetupIn(BaseModel):
    """``POST /setup``: sent when a backend is connected and before every batch of predictions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    # The strings the backend keeps per project are bounded (see service.label_studio.projects).
    project: str = Field("", max_length=200)
    label_config: str | None = Field(None, alias="schema")
    hostname: str | None = Field(None, max_length=2048)
    access_token: str | None = Field(None, max_length=4096)
    extra_params: dict[str, Any] | None = None

    @field_validator("extra_params", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        """The backend form stores extra params as JSON; accept its text form too."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    context: dict[str, Any] | None = None


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
