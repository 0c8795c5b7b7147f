"""``GET /metrics``: Prometheus text with the counters all workers and replicas share through the queue."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.dependencies import AppSettings, Queue, Served
from service.schemas import UNAUTHORIZED

router = APIRouter(tags=["metrics"], responses=UNAUTHORIZED)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(queue: Queue, settings: AppSettings, served: Served) -> Response:
    serving = await served.read()
    depth = await queue.depth([settings.model, *serving.models])
    body = metrics.render(await queue.read_metrics(), depth=depth, workers=serving.workers)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
