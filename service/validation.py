"""Check a parsed request against the served model and the limits, and build its job record.

The API holds no weights: layer counts, context length and image size come from the workers'
heartbeats, captions are counted with open_clip's tokenizer for the model name, and the image is
decoded once (with the pixel limit) to know its size. Everything the engine would refuse is refused
here, before anything is enqueued, with a message that says what is allowed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from attribution import models as _models  # noqa: F401 - registers exclip-tiny with open_clip
from attribution.errors import AttributionError
from attribution.images import decode_image
from attribution.selections import Box, Span, TokenRange, selected_tokens
from attribution.text import tokenize_caption
from service.errors import RequestInvalid
from service.jobs import Job
from service.schemas import ExplainInput, SelectionIn
from service.settings import Settings


@lru_cache(maxsize=16)
def _tokenizer(model: str) -> Any:
    import open_clip

    return open_clip.get_tokenizer(model)


def served_models(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Model name -> ``LoadedModel.describe()`` over all live workers."""
    out: dict[str, dict[str, Any]] = {}
    for worker in workers:
        for info in worker.get("models", []):
            out.setdefault(info["name"], info)
    return out


def default_model(served: dict[str, dict[str, Any]], settings: Settings) -> str | None:
    if settings.model in served:
        return settings.model
    return min(served) if served else None


def option_ranges(info: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The accepted range of every option for one model (shown by GET /models)."""
    return {
        "text_layer": {"min": 0, "max": info["text_layers"] - 1, "default": default_layer(info, "text")},
        "image_layer": {"min": 0, "max": info["image_layers"] - 1, "default": default_layer(info, "image")},
        "steps": {"min": 1, "max": settings.max_steps, "default": 10},
        "precision": ["float32", "bfloat16", "float16"],
        "format": ["json", "base64"],
        "wait": {"min": 0, "max": settings.wait_max_s, "default": settings.wait_max_s},
        "max_captions": settings.max_captions,
        "max_selections": settings.max_selections,
        "caption_tokens": {"max": info["context_length"], "note": "including start and end tokens"},
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": settings.max_pixels,
    }


def default_layer(info: dict[str, Any], tower: str) -> int:
    """The model's stated default block for ``tower`` (text/image); the last for workers that state none."""
    return info.get(f"default_{tower}_layer", info[f"{tower}_layers"] - 1)


def _layer(name: str, value: int | None, info: dict[str, Any], tower: str) -> int:
    n_layers = info[f"{tower}_layers"]
    if value is None:
        return default_layer(info, tower)
    if not 0 <= value < n_layers:
        raise RequestInvalid(f"{name} {value} is out of range: this model has {n_layers} blocks, "
                             f"use 0..{n_layers - 1} (or null for the model's default)")
    return value


def _selection(sel: SelectionIn, where: str, tokens: list, width: int, height: int) -> dict[str, Any]:
    try:
        if sel.span is not None:
            selected_tokens(tokens, Span(*sel.span))
            return {"kind": "span", "start": sel.span[0], "end": sel.span[1]}
        if sel.tokens is not None:
            selected_tokens(tokens, TokenRange(*sel.tokens))
            return {"kind": "tokens", "start": sel.tokens[0], "end": sel.tokens[1]}
        box = Box(*sel.box)
    except AttributionError as exc:
        raise RequestInvalid(f"{where}: {exc}") from None
    if box.x1 <= 0 or box.y1 <= 0 or box.x0 >= width or box.y0 >= height:
        raise RequestInvalid(f"{where}: box {list(sel.box)} lies outside the {width}x{height} image; "
                             f"give original-image pixels with 0 <= x < {width}, 0 <= y < {height}")
    return {"kind": "box", "box": list(sel.box)}


def image_size(data: bytes, settings: Settings) -> tuple[int, int]:
    """Decode the upload (header pixel check first) and return its upright (width, height)."""
    try:
        return decode_image(data, max_pixels=settings.max_pixels).size
    except AttributionError as exc:
        raise RequestInvalid(str(exc)) from None


def build_job(inp: ExplainInput, served: dict[str, dict[str, Any]], settings: Settings,
              size: tuple[int, int], owner: str | None) -> Job:
    """The job record for a valid request; raises ``RequestInvalid`` naming the first problem."""
    opts = inp.options
    name = opts.model or default_model(served, settings)
    if name not in served:
        raise RequestInvalid(f"unknown model {name!r}: the workers hold {', '.join(sorted(served))} "
                             "(see GET /models)")
    info = served[name]
    if not 1 <= len(inp.captions) <= settings.max_captions:
        raise RequestInvalid(f"{len(inp.captions)} captions given; allowed: 1..{settings.max_captions} "
                             "per request (EXCLIP_MAX_CAPTIONS)")
    n_selections = sum(len(c.selections) for c in inp.captions)
    if n_selections > settings.max_selections:
        raise RequestInvalid(f"{n_selections} selections given; allowed: at most {settings.max_selections} "
                             "per request (EXCLIP_MAX_SELECTIONS)")
    if not 1 <= opts.steps <= settings.max_steps:
        raise RequestInvalid(f"steps {opts.steps} is out of range: use 1..{settings.max_steps}")
    text_layer = _layer("text_layer", opts.text_layer, info, "text")
    image_layer = _layer("image_layer", opts.image_layer, info, "image")

    captions, context_length = [], info["context_length"]
    for i, caption in enumerate(inp.captions):
        try:
            _, tokens = tokenize_caption(caption.text, _tokenizer(name), context_length=context_length)
        except AttributionError as exc:
            raise RequestInvalid(f"caption {i}: {exc}") from None
        selections = [_selection(s, f"caption {i}, selection {j}", tokens, *size)
                      for j, s in enumerate(caption.selections)]
        captions.append({"text": caption.text, "selections": selections})

    request = {"model": name, "text_layer": text_layer, "image_layer": image_layer, "steps": opts.steps,
               "precision": opts.precision, "format": opts.format, "captions": captions}
    return Job(model=name, request=request, owner=owner)
