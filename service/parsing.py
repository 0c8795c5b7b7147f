"""Turn a ``POST /explain`` body — multipart form or JSON — into one ``ExplainInput``.

Only syntax is checked here (fields, numbers, base64); what depends on the model (layers, caption
length, selections against tokens and image) is checked in service.validation.
"""

from __future__ import annotations

import base64
import binascii
import re

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from attribution.errors import InvalidSelection
from attribution.selections import Selection, echo, parse_indexed
from service.errors import RequestInvalid
from service.jobs import CaptionRequest
from service.schemas import FORM_FIELD_ALIASES, SELECTION_FIELDS, ExplainInput, ExplainJSON, ExplainOptions
from service.settings import Settings

OPTION_FIELDS = tuple(ExplainOptions.model_fields)
# Form field -> the selection kind it gives (its own name, or the one an older spelling stands for).
FORM_KINDS = {**{kind: kind for kind in SELECTION_FIELDS}, **FORM_FIELD_ALIASES}
REPEATABLE = ("caption", *FORM_KINDS)
FORM_FIELDS = ("image", *REPEATABLE, *OPTION_FIELDS)


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def parse_request(request: Request, settings: Settings) -> ExplainInput:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await request.body()
        check_json_values(body, json_value_limit(settings))
        return await run_in_threadpool(parse_json, body)
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await parse_form(request, max_selections=settings.max_selections)
    raise RequestInvalid(
        f"unsupported content type {content_type or 'none'!r}: send multipart/form-data "
        "(image file + caption fields) or application/json (image as base64)",
        415,
    )


def json_value_limit(settings: Settings) -> int:
    """Most JSON values a request within the limits can hold: captions of the longest text (counted in
    full, in case every character is a comma), their selections, and the options."""
    return 64 + settings.max_captions * (settings.max_caption_chars + 16) + 16 * settings.max_selections


def check_json_values(body: bytes, limit: int) -> None:
    """Refuse a body with more JSON values than ``limit`` before parsing it.

    Every value after the first needs a comma or opens an array or object, so these bytes bound the
    count; the image's base64 has none. Parsing and validating millions of tiny values would cost
    seconds and gigabytes before the caption and selection limits could be checked.
    """
    count = body.count(b",") + body.count(b"[") + body.count(b"{")
    if count > limit:
        raise RequestInvalid(
            f"JSON body holds more than {limit} values (commas, arrays, objects): more than a request "
            "within the caption and selection limits (EXCLIP_MAX_CAPTIONS, EXCLIP_MAX_SELECTIONS, "
            "EXCLIP_MAX_CAPTION_CHARS) can hold"
        )


def parse_json(body: bytes) -> ExplainInput:
    try:
        data = ExplainJSON.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise RequestInvalid(f"body is not valid JSON: {exc.errors()[0]['msg']}", 400) from None
        raise RequestInvalid(_pydantic_message(exc)) from None
    text = data.image.strip()
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        image = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError) as exc:
        message = f"image is not valid base64 ({exc}); send the file's bytes base64-encoded"
        raise RequestInvalid(message) from None
    captions = []
    for i, caption in enumerate(data.captions):
        try:
            captions.append(CaptionRequest(caption) if isinstance(caption, str) else caption.to_request())
        except InvalidSelection as exc:
            raise RequestInvalid(f"caption {i}: {exc}") from None
    options = ExplainOptions.model_validate(data.model_dump(exclude={"image", "captions"}))
    return ExplainInput(image=image, captions=captions, options=options)


def _selection(field: str, value: str) -> tuple[int, Selection]:
    """A ``[C:]...`` form field -> (caption index, default 0; the selection), with the library's syntax."""
    try:
        caption, selection = parse_indexed(FORM_KINDS[field], value)
    except InvalidSelection as exc:
        raise RequestInvalid(str(exc)) from None
    return caption or 0, selection


async def _check_complete(request: Request) -> None:
    """A multipart body must end with its closing boundary: a cut-off upload is malformed, not short."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in await request.body():
        raise RequestInvalid(
            "multipart body is malformed: it does not end with the closing boundary "
            f"--{boundary.decode(errors='replace')}-- (cut off, or not multipart)",
            400,
        )


async def parse_form(request: Request, *, max_selections: int) -> ExplainInput:
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        await _check_complete(request)
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + 64 + max_selections)
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise RequestInvalid(f"unknown form field(s) {', '.join(unknown)}; allowed: {', '.join(FORM_FIELDS)}")
    single = [k for k in form.keys() if k not in REPEATABLE and len(form.getlist(k)) > 1]
    if single:
        raise RequestInvalid(f"form field(s) {', '.join(sorted(set(single)))} may be given only once")

    upload = form.get("image")
    if upload is None:
        raise RequestInvalid("missing image: send the image file as form field 'image' (-F image=@photo.jpg)")
    if not isinstance(upload, UploadFile):
        raise RequestInvalid("form field 'image' must be a file upload (-F image=@photo.jpg), not text")
    image = await upload.read()

    texts = [str(c) for c in form.getlist("caption")]
    if not texts:
        raise RequestInvalid("missing caption: give at least one form field 'caption' (-F caption='a dog')")
    selections: list[list[Selection]] = [[] for _ in texts]

    for field in FORM_KINDS:
        for value in map(str, form.getlist(field)):
            caption, selection = _selection(field, value)
            if not 0 <= caption < len(texts):
                raise RequestInvalid(
                    f"{field}={echo(value)} refers to caption {caption}, but there are "
                    f"{len(texts)} caption(s) (0..{len(texts) - 1})"
                )
            selections[caption].append(selection)

    # Empty HTML form fields mean "default".
    raw = {k: str(form[k]) for k in OPTION_FIELDS if k in form and str(form[k]).strip() != ""}
    try:
        options = ExplainOptions.model_validate(raw)
    except ValidationError as exc:
        raise RequestInvalid(_pydantic_message(exc)) from None
    return ExplainInput(
        image=image,
        captions=[CaptionRequest(t, tuple(s)) for t, s in zip(texts, selections, strict=True)],
        options=options,
    )
