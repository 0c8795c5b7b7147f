"""``GET /healthz`` (the process answers) and ``GET /readyz`` (queue reachable and a worker holds a model)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.dependencies import Queue, Served
from service.errors import QUEUE_DOWN, WritesRefused
from service.validation import warm_up

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _not_ready(reason: str) -> JSONResponse:
    body = {"status": "not ready", "reason": reason}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/readyz")
async def readyz(queue: Queue, served: Served) -> JSONResponse:
    try:
        await queue.ping()
        models = (await served.read()).models
    except QUEUE_DOWN as exc:
        return _not_ready(f"queue unreachable: {exc}")
    except WritesRefused as exc:  # jobs would be refused: say why, as /explain does
        return _not_ready(str(exc))
    if not models:
        return _not_ready("no live worker holds a model")
    await run_in_threadpool(warm_up, models)  # loads on the first call; about a millisecond after
    await queue.warm_up()
    return JSONResponse({"status": "ready", "models": sorted(models)})
