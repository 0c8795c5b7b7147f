"""Check a parsed request against the served model and the limits, and build its job record.

The API holds no weights: layer counts, context length and image size come from the workers'
heartbeats, captions are counted with open_clip's tokenizer for the model name, the image's size is
read from its header and the model's transform places its crop box, against which boxes are checked.
Everything the engine would refuse is refused here, before anything is enqueued, with a message that
says what is allowed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from PIL import Image

from attribution import models as _models  # noqa: F401 - registers exclip-tiny with open_clip
from attribution.decode import image_size as read_image_size
from attribution.errors import AttributionError, InvalidOption
from attribution.geometry import transform_geometry
from attribution.quadrature import check_integration
from attribution.selections import check_selection
from attribution.text import Tokenizer, tokenize_caption
from service.catalog import ModelInfo, default_model
from service.errors import RequestInvalid
from service.jobs import Job, JobRequest
from service.schemas import ExplainInput
from service.settings import Settings


@lru_cache(maxsize=16)
def _tokenizer(model: str) -> Tokenizer:
    import open_clip

    return open_clip.get_tokenizer(model)


def warm_up(models: dict[str, ModelInfo]) -> None:
    """Run what a request's checks run once per model now (tokenizer, eval transform, geometry, PIL's
    decoders), so the first request does not pay for loading and first calls."""
    Image.init()
    for name, info in models.items():
        tokenize_caption("a photo of a dog", _tokenizer(name), context_length=info.context_length)
        transform = _transform(tuple(info.image_size))
        transform_geometry(
            320, 240, transform, (info.patch_size[0], info.patch_size[1]), (info.grid[0], info.grid[1])
        )


def _layer(name: str, value: int | None, info: ModelInfo, tower: str) -> int:
    n_layers = info.layers(tower)
    if value is None:
        return info.default_layer(tower)
    if not 0 <= value < n_layers:
        raise RequestInvalid(
            f"{name} {value} is out of range: this model has {n_layers} blocks, "
            f"use 0..{n_layers - 1} (or null for the model's default)"
        )
    return value


@lru_cache(maxsize=16)
def _transform(image_size: tuple[int, ...]) -> Any:
    """The eval transform open_clip builds for a model input of this size (resize, centre crop)."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False)


def image_size(data: bytes, settings: Settings) -> tuple[int, int]:
    """The upload's upright (width, height), from its header (format, pixel and aspect-ratio checks)."""
    try:
        return read_image_size(data, max_pixels=settings.max_pixels)
    except AttributionError as exc:
        raise RequestInvalid(str(exc)) from None


def build_job(
    inp: ExplainInput,
    served: dict[str, ModelInfo],
    settings: Settings,
    size: tuple[int, int],
    owner: str | None,
) -> Job:
    """The job record for a valid request; raises ``RequestInvalid`` naming the first problem."""
    opts = inp.options
    name = opts.model or default_model(served, settings)
    if name not in served:
        raise RequestInvalid(
            f"unknown model {name!r}: the workers hold {', '.join(sorted(served))} (see GET /models)"
        )
    info = served[name]
    if not 1 <= len(inp.captions) <= settings.max_captions:
        raise RequestInvalid(
            f"{len(inp.captions)} captions given; allowed: 1..{settings.max_captions} "
            "per request (EXCLIP_MAX_CAPTIONS)"
        )
    n_selections = sum(len(c.selections) for c in inp.captions)
    if n_selections > settings.max_selections:
        raise RequestInvalid(
            f"{n_selections} selections given; allowed: at most {settings.max_selections} "
            "per request (EXCLIP_MAX_SELECTIONS)"
        )
    if not 1 <= opts.steps <= settings.max_steps:
        raise RequestInvalid(f"steps {opts.steps} is out of range: use 1..{settings.max_steps}")
    try:
        check_integration(opts.quadrature, opts.steps, opts.tolerance)
    except InvalidOption as exc:
        raise RequestInvalid(str(exc)) from None
    text_layer = _layer("text_layer", opts.text_layer, info, "text")
    image_layer = _layer("image_layer", opts.image_layer, info, "image")

    patch_size = (info.patch_size[0], info.patch_size[1])
    grid = (info.grid[0], info.grid[1])
    geometry = transform_geometry(*size, _transform(tuple(info.image_size)), patch_size, grid)
    for i, caption in enumerate(inp.captions):
        try:
            _, tokens = tokenize_caption(
                caption.text,
                _tokenizer(name),
                context_length=info.context_length,
                max_chars=settings.max_caption_chars,
            )
            for selection in caption.selections:
                check_selection(selection, tokens, geometry)
        except AttributionError as exc:
            raise RequestInvalid(f"caption {i}: {exc}") from None

    request = JobRequest(
        model=name,
        text_layer=text_layer,
        image_layer=image_layer,
        steps=opts.steps,
        precision=opts.precision,
        quadrature=opts.quadrature,
        tolerance=opts.tolerance,
        format=opts.format,
        captions=tuple(inp.captions),
    )
    return Job(request=request, owner=owner)
