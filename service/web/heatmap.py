"""``GET /jobs/{id}/heatmap.png``: a job's heatmap over its original image, for scripts and the CLI.

Selections (at most one): ``span=S:E`` (character offsets of the caption), ``tokens=S:E`` (token
indices, end exclusive), ``box=x0,y0,x1,y1`` (original pixels); none means the whole caption (the
sum over all tokens). Span and tokens use ``attribution.selections.span_heatmap``, so the image shows
exactly the numbers the JSON API returns for that selection. A box selects patches, which gives one
score per token rather than a heatmap; its PNG is kept simple: the whole-caption heatmap with the box
outlined on top (the per-token box scores are in the JSON result).

The image keeps its original size and mode RGB unless ``legend=true``, which appends a colour-scale
band below it; ``alpha`` is the overlay opacity.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from attribution.errors import AttributionError
from attribution.images import ImageGeometry, decode_image
from attribution.selections import Box, Span, TokenRange, box_token_scores, span_heatmap
from attribution.text import Token
from service.dependencies import Queue, owned_job
from service.schemas import ErrorOut
from service.web.render import render_overlay

router = APIRouter()


def _pair(value: str, name: str) -> tuple[int, int]:
    parts = value.split(":")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise HTTPException(
            422, f"{name}={value!r} is not START:END with two integers, e.g. {name}=1:3"
        ) from None
    return start, end


def _box(value: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(p) for p in value.split(","))
    except ValueError:
        raise HTTPException(422, f"box={value!r} is not x0,y0,x1,y1 with four numbers in original pixels, "
                                 "e.g. box=10,20,110,80") from None
    return Box(x0, y0, x1, y1)


def _interactions(caption: dict[str, Any]) -> torch.Tensor:
    """The (tokens, rows, cols) matrix from either result format (JSON lists or base64 float32)."""
    matrix = caption["interactions"]
    if isinstance(matrix, dict):
        data = np.frombuffer(base64.b64decode(matrix["data"]), dtype="<f4")
        return torch.from_numpy(data.reshape(matrix["shape"]).copy())
    return torch.tensor(matrix, dtype=torch.float32)


@dataclass(frozen=True)
class _Matrix:
    """What the selection functions read from a result: the (tokens, rows, cols) interactions."""

    interactions: torch.Tensor


def _geometry(caption: dict[str, Any]) -> ImageGeometry:
    image, grid = caption["image"], caption["grid"]
    return ImageGeometry(
        width=image["width"],
        height=image["height"],
        crop_box=tuple(float(v) for v in image["crop_box"]),
        grid=(grid["rows"], grid["cols"]),
        patch_size=tuple(float(v) for v in image["patch_size"]),
    )


def _tokens(caption: dict[str, Any]) -> list[Token]:
    # The result JSON leaves out vocabulary ids; selections only use positions and offsets.
    return [Token(index=t["index"], id=-1, text=t["text"], start=t["start"], end=t["end"])
            for t in caption["tokens"]]


def selection_heatmap(caption: dict[str, Any], span: str | None, tokens: str | None,
                      box: str | None) -> tuple[np.ndarray, Box | None]:
    """The (rows, cols) heatmap to draw for a selection, and the box to outline (if any)."""
    given = [name for name, value in (("span", span), ("tokens", tokens), ("box", box)) if value is not None]
    if len(given) > 1:
        raise HTTPException(
            422, f"give at most one selection (span, tokens or box), not {' and '.join(given)}"
        )
    result = _Matrix(_interactions(caption))
    selected_box = None
    try:
        if span is not None:
            heat = span_heatmap(result, _tokens(caption), Span(*_pair(span, "span")))
        elif tokens is not None:
            heat = span_heatmap(result, _tokens(caption), TokenRange(*_pair(tokens, "tokens")))
        else:
            if box is not None:
                selected_box = _box(box)
                box_token_scores(result, _geometry(caption), selected_box)  # validates the box
            heat = result.interactions.sum(dim=0)
    except AttributionError as exc:
        raise HTTPException(422, str(exc)) from None
    return heat.double().numpy(), selected_box


@router.get("/jobs/{job_id}/heatmap.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The overlay as PNG"},
                       401: {"model": ErrorOut, "description": "missing or wrong API key"},
                       404: {"model": ErrorOut, "description": "unknown job"},
                       410: {"model": ErrorOut, "description": "its image or result was evicted"},
                       409: {"model": ErrorOut, "description": "the job is not done"}})
async def heatmap_png(
    queue: Queue,
    job: Annotated[dict[str, Any], Depends(owned_job)],
    caption: int = Query(0, ge=0, description="Index of the caption in the job"),
    span: str | None = Query(None, description="Character span START:END of the caption"),
    tokens: str | None = Query(None, description="Token range START:END (end exclusive)"),
    box: str | None = Query(None, description="Box x0,y0,x1,y1 in original pixels"),
    legend: bool = Query(False, description="Append a colour-scale band below the image"),
    alpha: float = Query(0.6, ge=0.0, le=1.0, description="Overlay opacity"),
) -> Response:
    if job["status"] != "done":
        raise HTTPException(409, f"job {job['id']} is {job['status']}; a heatmap needs a done job "
                                 "(poll GET /jobs/{id} until its status is done)")
    if job["result"] is None:
        raise HTTPException(410, f"the result of job {job['id']} was dropped to keep the stored bytes within "
                                 "their budget (EXCLIP_MAX_STORED_BYTES); submit the job again")
    captions = job["result"]["captions"]
    if caption >= len(captions):
        raise HTTPException(422, f"caption={caption} is out of range: the job has {len(captions)} "
                                 f"caption(s), indices 0..{len(captions) - 1}")
    chosen = captions[caption]
    heat, outline = selection_heatmap(chosen, span, tokens, box)
    data = await queue.image(job["id"])
    if data is None:
        raise HTTPException(410, f"the image of job {job['id']} was dropped to keep the stored bytes within "
                                 "their budget (EXCLIP_MAX_STORED_BYTES); submit the job again")
    coords = None if outline is None else (outline.x0, outline.y0, outline.x1, outline.y1)
    png = await run_in_threadpool(_render_png, data, heat, chosen["image"]["crop_box"], alpha, coords, legend)
    return Response(png, media_type="image/png")


def _render_png(data: bytes, heat: np.ndarray, crop_box: list[float], alpha: float,
                box: tuple[float, float, float, float] | None, legend: bool) -> bytes:
    """Decode, draw and encode (CPU-bound: run off the event loop)."""
    image = render_overlay(decode_image(data), heat, crop_box, alpha=alpha, box=box, legend=legend)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
