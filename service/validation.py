"""Check a parsed request against the served model and the limits, and build its job record.

The API holds no weights: layer counts, context length and image size come from the workers'
heartbeats, captions are counted with open_clip's tokenizer for the model name, the image's size is
read from its header and the model's transform places its crop box, against which boxes are checked.
Everything the engine would refuse is refused here, before anything is enqueued, with a message that
says what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from service.jobs import CaptionRequest, Job, JobRequest
from service.schemas import ExplainInput, ExplainOptions
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
def _transform(size: tuple[int, ...]) -> Any:
    """The eval transform open_clip builds for a model input of this size (resize, centre crop)."""
    import open_clip

    return open_clip.image_transform(size, is_train=False)


@dataclass(frozen=True)
class ExplainCall:
    """A request as the service takes it from any front end (the HTTP routes, the Label Studio
    backend): typed selections, and options where None means the served model's default."""

    captions: tuple[CaptionRequest, ...]
    model: str | None = None
    text_layer: int | None = None
    image_layer: int | None = None
    steps: int = ExplainOptions.model_fields["steps"].default
    precision: str = ExplainOptions.model_fields["precision"].default
    quadrature: str | None = None  # None: the engine's default rule (or, with a tolerance, its nested one)
    tolerance: float | None = None
    text_reference: str | None = None  # None: the engine's default convention
    format: str = ExplainOptions.model_fields["format"].default


def upload_size(data: bytes, settings: Settings) -> tuple[int, int]:
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
    """The job record for a valid HTTP request; raises ``RequestInvalid`` naming the first problem."""
    opts = inp.options
    call = ExplainCall(
        tuple(inp.captions),
        opts.model,
        opts.text_layer,
        opts.image_layer,
        opts.steps,
        opts.precision,
        opts.quadrature,
        opts.tolerance,
        opts.text_reference,
        opts.format,
    )
    return build_call_job(call, served, settings, size, owner)


def build_call_job(
    call: ExplainCall,
    served: dict[str, ModelInfo],
    settings: Settings,
    size: tuple[int, int],
    owner: str | None,
) -> Job:
    """The job record for a valid request; raises ``RequestInvalid`` naming the first problem."""
    name = call.model or default_model(served, settings)
    if name not in served:
        raise RequestInvalid(
            f"unknown model {name!r}: the workers hold {', '.join(sorted(served))} (see GET /models)"
        )
    info = served[name]
    if not 1 <= len(call.captions) <= settings.max_captions:
        raise RequestInvalid(
            f"{len(call.captions)} captions given; allowed: 1..{settings.max_captions} "
            "per request (EXCLIP_MAX_CAPTIONS)"
        )
    n_selections = sum(len(c.selections) for c in call.captions)
    if n_selections > settings.max_selections:
        raise RequestInvalid(
            f"{n_selections} selections given; allowed: at most {settings.max_selections} "
            "per request (EXCLIP_MAX_SELECTIONS)"
        )
    if not 1 <= call.steps <= settings.max_steps:
        raise RequestInvalid(f"steps {call.steps} is out of range: use 1..{settings.max_steps}")
    try:
        check_integration(call.quadrature, call.steps, call.tolerance)
    except InvalidOption as exc:
        raise RequestInvalid(str(exc)) from None
    text_layer = _layer("text_layer", call.text_layer, info, "text")
    image_layer = _layer("image_layer", call.image_layer, info, "image")

    patch_size = (info.patch_size[0], info.patch_size[1])
    grid = (info.grid[0], info.grid[1])
    geometry = transform_geometry(*size, _transform(tuple(info.image_size)), patch_size, grid)
    for i, caption in enumerate(call.captions):
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
        steps=call.steps,
        precision=call.precision,
        quadrature=call.quadrature,
        tolerance=call.tolerance,
        text_reference=call.text_reference,
        format=call.format,
        captions=call.captions,
    )
    return Job(request=request, owner=owner)
