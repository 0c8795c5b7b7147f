"""``GET /jobs/{id}/heatmap.png``: a job's heatmap over its original image, for scripts and the CLI.

Selections (at most one): ``span=S:E`` (character offsets of the caption), ``tokens=S:E`` (token
indices, end exclusive), ``box=x0,y0,x1,y1`` (original pixels); none means the whole caption (the
sum over all tokens). Span and tokens use ``attribution.selections.span_heatmap``, so the image shows
exactly the numbers the JSON API returns for that selection. A box selects patches, which gives one
score per token rather than a heatmap; its PNG is kept simple: the whole-caption heatmap with the box
outlined on top (the per-token box scores are in the JSON result). Each query parameter may be given
once (422, where FastAPI alone would take the last value).

The PNG has the image's size, scaled down to at most ``max_side`` px on the long side (default and
cap: ``render.MAX_SIDE``), mode RGB; ``legend=true`` appends a colour-scale band below it; ``alpha``
is the overlay opacity. At most ``EXCLIP_MAX_RENDERS`` renders run at once; a request waits up to
``SLOT_WAIT_S`` for a free slot, then gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from attribution.errors import InvalidSelection
from attribution.pipeline import Explanation
from attribution.selections import SELECTION_KINDS, Box, check_box, span_heatmap
from service.dependencies import AppSettings, OwnedJob, Queue
from service.jobs import JobStatus
from service.schemas import UNAUTHORIZED, ErrorOut, InvalidOut
from service.web.render import MAX_SIDE, render_png

router = APIRouter(tags=["jobs"])
SLOT_WAIT_S = 30.0
# The route's query parameters; each may be given once (FastAPI would silently use the last value).
QUERY_PARAMS = ("caption", "span", "tokens", "box", "legend", "alpha", "max_side")


def refuse_repeated(request: Request) -> None:
    """422 if a query parameter of the route is given more than once (``span=0:2&span=0:3``)."""
    repeated = [name for name in QUERY_PARAMS if len(request.query_params.getlist(name)) > 1]
    if repeated:
        raise HTTPException(
            422, f"query parameter(s) {', '.join(repeated)} may be given only once (got more than one value)"
        )


def selection_heatmap(
    caption: dict[str, Any], span: str | None, tokens: str | None, box: str | None
) -> tuple[np.ndarray, Box | None]:
    """The (rows, cols) heatmap to draw and the box to outline: a span's or token range's heatmap, else
    the whole caption's (a box is validated, then outlined)."""
    given = {k: v for k, v in (("span", span), ("tokens", tokens), ("box", box)) if v is not None}
    if len(given) > 1:
        names = " and ".join(given)
        raise HTTPException(422, f"give at most one selection (span, tokens or box), not {names}")
    explanation = Explanation.from_dict(caption)
    interactions = explanation.result.interactions
    try:
        selection = next((SELECTION_KINDS[kind].parse(value) for kind, value in given.items()), None)
        if isinstance(selection, Box):
            check_box(selection, explanation.geometry)
        elif selection is not None:
            return span_heatmap(interactions, explanation.tokens, selection).numpy(), None
    except InvalidSelection as exc:
        raise HTTPException(422, str(exc)) from None
    return interactions.sum(dim=0).numpy(), selection


@router.get(
    "/jobs/{job_id}/heatmap.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The overlay as PNG"},
        **UNAUTHORIZED,
        404: {"model": ErrorOut, "description": "unknown job"},
        409: {"model": ErrorOut, "description": "the job is not done"},
        410: {"model": ErrorOut, "description": "its image or result was evicted"},
        422: {
            "model": InvalidOut,
            "description": "a parameter of the wrong type or range (a list of field errors), or a "
            "selection, caption index or repeated parameter the route refuses (a message)",
        },
        503: {"model": ErrorOut, "description": "every render slot is busy: retry"},
    },
)
async def heatmap_png(
    request: Request,
    queue: Queue,
    settings: AppSettings,
    job: OwnedJob,
    caption: int = Query(0, ge=0, description="Index of the caption in the job"),
    span: str | None = Query(None, description="Character span START:END of the caption"),
    tokens: str | None = Query(None, description="Token range START:END (end exclusive)"),
    box: str | None = Query(None, description="Box x0,y0,x1,y1 in original pixels"),
    legend: bool = Query(False, description="Append a colour-scale band below the image"),
    alpha: float = Query(0.6, ge=0.0, le=1.0, allow_inf_nan=False, description="Overlay opacity"),
    max_side: int = Query(MAX_SIDE, ge=16, le=MAX_SIDE, description="Longest side of the PNG in pixels"),
) -> Response:
    refuse_repeated(request)
    if job.status is not JobStatus.DONE:
        raise HTTPException(
            409,
            f"job {job.id} is {job.status.value}; a heatmap needs a done job "
            "(poll GET /jobs/{id} until its status is done)",
        )
    if job.result is None or job.evicted:
        raise HTTPException(
            410,
            f"the result of job {job.id} was dropped to keep the stored bytes within "
            "their budget (EXCLIP_MAX_STORED_BYTES); submit the job again",
        )
    captions = job.result["captions"]
    if caption >= len(captions):
        raise HTTPException(
            422,
            f"caption={caption} is out of range: the job has {len(captions)} "
            f"caption(s), indices 0..{len(captions) - 1}",
        )
    chosen = captions[caption]
    heat, outline = selection_heatmap(chosen, span, tokens, box)
    state = request.app.state  # one semaphore per app, made inside the app's event loop
    if getattr(state, "render_slots", None) is None:
        state.render_slots = asyncio.Semaphore(settings.max_renders)
    slots = state.render_slots
    try:
        await asyncio.wait_for(slots.acquire(), SLOT_WAIT_S)
    except TimeoutError:
        raise HTTPException(
            503,
            f"{settings.max_renders} heatmaps are being rendered; retry in a moment (EXCLIP_MAX_RENDERS)",
            headers={"Retry-After": "2"},
        ) from None
    try:
        data = await queue.image(job.id)
        if data is None:
            raise HTTPException(
                410,
                f"the image of job {job.id} was dropped to keep the stored bytes within "
                "their budget (EXCLIP_MAX_STORED_BYTES); submit the job again",
            )
        box_coords = None if outline is None else (outline.x0, outline.y0, outline.x1, outline.y1)
        png = await run_in_threadpool(  # CPU-bound: off the event loop
            render_png,
            data,
            heat,
            chosen["image"]["crop_box"],
            alpha=alpha,
            box=box_coords,
            legend=legend,
            max_side=max_side,
            max_pixels=settings.max_pixels,
        )
    finally:
        slots.release()
    return Response(png, media_type="image/png")
