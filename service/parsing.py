"""Turn a ``POST /explain`` body — multipart form or JSON — into one ``ExplainInput``.

Only syntax is checked here (fields, numbers, base64); what depends on the model (layers, caption
length, selections against tokens and image) is checked in service.validation.
"""

from __future__ import annotations

import base64
import binascii
import re

from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from service.errors import RequestInvalid
from service.schemas import (
    SELECTION_FIELDS,
    CaptionIn,
    ExplainInput,
    ExplainJSON,
    ExplainOptions,
    SelectionIn,
)

OPTION_FIELDS = tuple(ExplainOptions.model_fields)
REPEATABLE = ("caption", *SELECTION_FIELDS)
FORM_FIELDS = ("image", *REPEATABLE, *OPTION_FIELDS)


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def parse_request(request: Request, *, max_selections: int) -> ExplainInput:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return parse_json(await request.body())
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await parse_form(request, max_selections=max_selections)
    raise RequestInvalid(f"unsupported content type {content_type or 'none'!r}: send multipart/form-data "
                         "(image file + caption fields) or application/json (image as base64)", 415)


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
    captions = [CaptionIn(text=c) if isinstance(c, str) else c for c in data.captions]
    options = ExplainOptions.model_validate(data.model_dump(exclude={"image", "captions"}))
    return ExplainInput(image=image, captions=captions, options=options)


def _caption_and_rest(field: str, value: str, n_parts: int | None) -> tuple[int, str]:
    """``C:REST`` → (C, REST); plain ``REST`` → (0, REST). ``n_parts``: colon parts REST has."""
    parts = value.split(":")
    if (n_parts is not None and len(parts) == n_parts + 1) or (n_parts is None and len(parts) == 2):
        head, rest = value.split(":", 1)
        try:
            return int(head), rest
        except ValueError:
            raise RequestInvalid(f"{field}={value!r}: caption index {head!r} is not an integer") from None
    return 0, value


def _pair(field: str, value: str) -> tuple[int, tuple[int, int]]:
    caption, rest = _caption_and_rest(field, value, 2)
    try:
        start, end = (int(p) for p in rest.split(":"))
    except ValueError:
        raise RequestInvalid(f"{field}={value!r} is malformed: use START:END or C:START:END with integers "
                             f"(C is the caption index, e.g. {field}=0:2:5)") from None
    return caption, (start, end)


def _box(value: str) -> tuple[int, tuple[float, float, float, float]]:
    caption, rest = _caption_and_rest("box", value, None)
    try:
        x0, y0, x1, y1 = (float(p) for p in rest.split(","))
    except ValueError:
        raise RequestInvalid(f"box={value!r} is malformed: use x0,y0,x1,y1 or C:x0,y0,x1,y1 with numbers "
                             "(original-image pixels, C is the caption index)") from None
    return caption, (x0, y0, x1, y1)


async def _check_complete(request: Request) -> None:
    """A multipart body must end with its closing boundary: a cut-off upload is malformed, not short."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in await request.body():
        raise RequestInvalid("multipart body is malformed: it does not end with the closing boundary "
                             f"--{boundary.decode(errors='replace')}-- (cut off, or not multipart)", 400)


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
    selections: list[list[SelectionIn]] = [[] for _ in texts]

    def add(caption: int, selection: SelectionIn, field: str, value: str) -> None:
        if not 0 <= caption < len(texts):
            raise RequestInvalid(f"{field}={value!r} refers to caption {caption}, but there are "
                                 f"{len(texts)} caption(s) (0..{len(texts) - 1})")
        selections[caption].append(selection)

    for value in form.getlist("span"):
        caption, pair = _pair("span", str(value))
        add(caption, SelectionIn(span=pair), "span", str(value))
    for value in form.getlist("token_range"):
        caption, pair = _pair("token_range", str(value))
        add(caption, SelectionIn(tokens=pair), "token_range", str(value))
    for value in form.getlist("box"):
        caption, box = _box(str(value))
        add(caption, SelectionIn(box=box), "box", str(value))

    # Empty HTML form fields mean "default".
    raw = {k: str(form[k]) for k in OPTION_FIELDS if k in form and str(form[k]).strip() != ""}
    try:
        options = ExplainOptions.model_validate(raw)
    except ValidationError as exc:
        raise RequestInvalid(_pydantic_message(exc)) from None
    return ExplainInput(image=image, captions=[CaptionIn(text=t, selections=s) for t, s in
                                               zip(texts, selections, strict=True)], options=options)
