"""``/label-studio``: the service as a Label Studio ML backend (paste ``http://HOST:PORT/label-studio``).

``GET /health`` is open (Label Studio gives it 1 s); the others take the service's API keys as
``Authorization: Bearer <key>`` or, since Label Studio can only send that, Basic auth with the key as
password, and read their JSON body only after the key was checked. Predictions are computed by the
workers through the job queue (service.label_studio.predictor); the backend's process-wide parts
(project setups, download limit, shutdown) are service.label_studio.backend's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.dependencies import AppSettings, Queue, Served, basic_or_bearer_owner
from service.label_studio.backend import ClientGone, LabelStudio
from service.label_studio.config import parse_label_config
from service.label_studio.predictor import (
    Predictor,
    default_thresholds,
    model_version,
    settings_model_version,
)
from service.label_studio.projects import ProjectSetup
from service.label_studio.protocol import ErrorOut, PredictIn, SetupIn, parse_predict
from service.schemas import inline_schema

PREFIX = "/label-studio"
CLIENT_CLOSED = 499
"""The status logged for a call whose client went away before its answer (nginx's convention)."""
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
    200: {
        "description": "one entry per task, in order; an entry without 'result' is no prediction (its "
        "'error' says why; a task left for the next call says so)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"results": {"type": "array", "items": {"type": "object"}}},
                    "required": ["results"],
                }
            }
        },
    },
    **_BODY,
    **{
        code: {"model": ErrorOut, "description": text}
        for code, text in [
            (429, "queue full"),
            (502, "Label Studio did not give the image (interactive requests)"),
        ]
    },
}


async def _model_version(served: Served, settings: AppSettings) -> str:
    serving = await served.read()
    name = serving.default(settings)
    if name is None:
        return settings_model_version(settings)
    return model_version(serving.models[name].name, serving.models[name].pretrained)


Parsed = TypeVar("Parsed", bound=BaseModel)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body as ``model`` itself (see ``_read``)."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}
    }


async def _read(request: Request, parse: Callable[[bytes], Parsed]) -> Parsed:
    """The JSON body as ``parse`` reads it, now: after the route's dependencies checked the key (FastAPI
    reads and parses a ``Body()`` parameter before any dependency runs), and off the event loop."""
    raw = await request.body()
    try:
        return await run_in_threadpool(parse, raw)
    except ValidationError as exc:
        # Without the inputs: they may be large, or bytes that are not text.
        errors = [{"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise RequestValidationError(errors) from None


@router.get("/health")
async def health() -> dict[str, str]:
    """Label Studio's liveness check."""
    return {"status": "UP", "model_class": "exclip"}


@router.post("/setup", responses=_BODY, openapi_extra=_json_body(SetupIn))
async def setup(
    request: Request,
    owner: LabelStudioOwner,
    served: Served,
    label_studio: LabelStudio,
    settings: AppSettings,
) -> dict[str, Any]:
    """Remember the project's Label Studio host, token and thresholds; check its label config."""
    body = await _read(request, SetupIn.model_validate_json)
    if body.label_config:
        parse_label_config(body.label_config)
    thresholds = default_thresholds(settings).given(body.extra_params)  # refuses bad ones
    setup = ProjectSetup(body.hostname, body.access_token, thresholds)
    await label_studio.projects.remember(owner, body.project, setup)
    return {"model_version": await _model_version(served, settings)}


@router.post("/predict", responses=_PREDICT, openapi_extra=_json_body(PredictIn))
async def predict(
    request: Request,
    owner: LabelStudioOwner,
    queue: Queue,
    label_studio: LabelStudio,
    served: Served,
    settings: AppSettings,
) -> Response:
    """One prediction per task, in order (a batch), or the regions for the annotator's span or box.

    Cancelled when the client disconnects or the service shuts down (service.label_studio.backend)."""
    body = await _read(request, parse_predict)
    project = body.project or (body.tasks[0].get("project") if body.tasks else None)
    setup = await label_studio.projects.get(owner, project)
    predictor = Predictor(queue, settings, owner, setup, label_studio.downloads)
    try:  # each entry is encoded off the event loop: masks take seconds
        entries = await label_studio.unless_abandoned(request, predictor.predict(body, served))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log shows the code
    return Response('{"results": [' + ", ".join(entries) + "]}", media_type="application/json")


@router.post("/webhook", responses=_AUTH)
async def webhook(owner: LabelStudioOwner) -> dict[str, str]:
    """Label Studio's event notifications (training triggers); this backend does not train."""
    return {"status": "ignored"}


@router.get("/versions", responses=_AUTH)
async def versions(owner: LabelStudioOwner, served: Served, settings: AppSettings) -> dict[str, Any]:
    return {"versions": [await _model_version(served, settings)]}
