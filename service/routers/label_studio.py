"""``/label-studio``: the service as a Label Studio ML backend (paste ``http://HOST:PORT/label-studio``).

``GET /health`` is open (Label Studio gives it 1 s); the others take the service's API keys as
``Authorization: Bearer <key>`` or, since Label Studio can only send that, Basic auth with the key as
password. Predictions are computed by the workers through the job queue (service.label_studio.predictor).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from service.catalog import default_model, served_models
from service.dependencies import AppSettings, Projects, Queue, basic_or_bearer_owner
from service.label_studio.config import parse_label_config
from service.label_studio.predictor import (
    Predictor,
    default_thresholds,
    model_version,
    settings_model_version,
)
from service.label_studio.projects import ProjectSetup
from service.label_studio.protocol import ErrorOut, PredictIn, SetupIn

PREFIX = "/label-studio"
router = APIRouter(prefix=PREFIX, tags=["label-studio"])
LabelStudioOwner = Annotated[str | None, Depends(basic_or_bearer_owner)]

_AUTH: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut, "description": "missing or wrong API key"}}
_BODY: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    **{
        code: {"model": ErrorOut, "description": text}
        for code, text in [
            (400, "malformed body"),
            (413, "body too large"),
            (422, "invalid request, label config or thresholds"),
            (503, "queue or workers unavailable"),
        ]
    },
}
_PREDICT: dict[int | str, dict[str, Any]] = {
    **_BODY,
    **{
        code: {"model": ErrorOut, "description": text}
        for code, text in [
            (429, "queue full"),
            (502, "Label Studio did not give the image (interactive requests)"),
        ]
    },
}


async def _model_version(queue: Queue, settings: AppSettings) -> str:
    served = served_models(await queue.workers())
    name = default_model(served, settings)
    if name is None:
        return settings_model_version(settings)
    return model_version(served[name].name, served[name].pretrained)


@router.get("/health")
async def health() -> dict[str, str]:
    """Label Studio's liveness check."""
    return {"status": "UP", "model_class": "exclip"}


@router.post("/setup", responses=_BODY)
async def setup(
    body: Annotated[SetupIn, Body()],
    owner: LabelStudioOwner,
    queue: Queue,
    projects: Projects,
    settings: AppSettings,
) -> dict[str, Any]:
    """Remember the project's Label Studio host, token and thresholds; check its label config."""
    if body.label_config:
        parse_label_config(body.label_config)
    thresholds = default_thresholds(settings).given(body.extra_params)  # refuses bad ones
    await projects.remember(body.project, ProjectSetup(body.hostname, body.access_token, thresholds))
    return {"model_version": await _model_version(queue, settings)}


@router.post("/predict", responses=_PREDICT)
async def predict(
    body: Annotated[PredictIn, Body()],
    owner: LabelStudioOwner,
    queue: Queue,
    projects: Projects,
    settings: AppSettings,
) -> dict[str, Any]:
    """One prediction per task, in order (a batch), or the regions for the annotator's span or box."""
    project = body.project or (body.tasks[0].get("project") if body.tasks else None)
    predictor = Predictor(queue, settings, owner, await projects.get(project))
    return {"results": await predictor.predict(body)}


@router.post("/webhook", responses=_AUTH)
async def webhook(owner: LabelStudioOwner) -> dict[str, str]:
    """Label Studio's event notifications (training triggers); this backend does not train."""
    return {"status": "ignored"}


@router.get("/versions", responses=_AUTH)
async def versions(owner: LabelStudioOwner, queue: Queue, settings: AppSettings) -> dict[str, Any]:
    return {"versions": [await _model_version(queue, settings)]}
