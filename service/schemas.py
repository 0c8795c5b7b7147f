"""HTTP request and response models (pydantic), separate from the domain objects in service.jobs.

``ExplainJSON`` is the ``application/json`` body of ``POST /explain`` and ``POST /jobs``; the
multipart form is parsed into the same ``ExplainInput`` by service.parsing. The response models
describe the Job JSON of docs/contract.md for the OpenAPI page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from attribution.explainer import (
    DEFAULT_PRECISION,
    DEFAULT_STEPS,
    DEFAULT_TEXT_REFERENCE,
    PRECISIONS,
    TEXT_REFERENCES,
)
from attribution.pipeline import MATRIX_FORMATS
from attribution.quadrature import RULES
from attribution.selections import Box, Selection, Span, TokenRange
from service.jobs import CaptionRequest, JobStatus

if TYPE_CHECKING:  # built from the registry at runtime, which mypy cannot follow: plain text to it
    Precision = str
    QuadratureRule = str
    TextReference = str
else:
    Precision = Literal[tuple(PRECISIONS)]
    QuadratureRule = Literal[RULES]
    TextReference = Literal[TEXT_REFERENCES]
MatrixFormat = Literal[MATRIX_FORMATS]  # type: ignore[valid-type]
# Multipart selection fields (repeatable), named by their selection kind, and their syntax; JSON bodies
# give them as lists under the same names instead.
SELECTION_FIELDS = {
    Span.KIND: "START:END or C:START:END (characters of caption C)",
    TokenRange.KIND: "START:END or C:START:END (token indices, end exclusive)",
    Box.KIND: "x0,y0,x1,y1 or C:x0,y0,x1,y1 (original-image pixels)",
}
# Older spellings of form fields, still accepted: field -> its name in SELECTION_FIELDS.
FORM_FIELD_ALIASES = {"token_range": TokenRange.KIND}

# Decimal text, and the names of the non-finite floats (left to each field's own finiteness check).
_DECIMAL = re.compile(r"[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)


def _plain_number(value: Any) -> Any:
    """A JSON number, or its decimal text (form fields are text); not a boolean, and not the other
    spellings pydantic's lax mode reads ("5_0" as 50, true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str) and not _DECIMAL.fullmatch(value.strip()):
        raise ValueError(f"must be a decimal number, got {value[:40]!r}")
    return value


class SelectionIn(BaseModel):
    """Exactly one of: a character span, a token range (end exclusive, SOT is 0), a pixel box."""

    model_config = ConfigDict(extra="forbid")
    span: tuple[int, int] | None = Field(None, description="characters [start, end) of the caption")
    tokens: tuple[int, int] | None = Field(None, description="token indices [start, end), SOT is 0")
    box: tuple[float, float, float, float] | None = Field(
        None, description="x0, y0, x1, y1 in original-image pixels"
    )

    @field_validator("span", "tokens", "box", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any) -> Any:
        return [_plain_number(v) for v in value] if isinstance(value, list | tuple) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> SelectionIn:
        given = [k for k in SELECTION_FIELDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a selection needs exactly one of span, tokens, box; got {given or 'none'}")
        return self

    def to_selection(self) -> Selection:
        """The typed selection (``InvalidSelection`` where the library refuses it, e.g. an empty span)."""
        if self.box is not None:
            return Box(*self.box)
        if self.span is not None:
            return Span(*self.span)
        assert self.tokens is not None  # exactly one of span, tokens, box (_exactly_one)
        return TokenRange(*self.tokens)


class CaptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    selections: list[SelectionIn] = Field(default_factory=list)

    def to_request(self) -> CaptionRequest:
        """The caption with typed selections (``InvalidSelection`` as ``SelectionIn.to_selection``)."""
        return CaptionRequest(self.text, tuple(s.to_selection() for s in self.selections))


class ExplainOptions(BaseModel):
    """Options shared by the JSON and the multipart forms.

    ``null`` layers mean the model's default blocks: ``default_text_layer`` / ``default_image_layer`` of
    its model card (the last block when the card names none), shown by ``GET /models`` as each model's
    ``options.text_layer.default`` / ``options.image_layer.default``.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a model the workers hold (GET /models)")
    text_layer: int | None = Field(
        None,
        description="text block to explain at (0-based); null: the model's default "
        "(GET /models: options.text_layer.default)",
    )
    image_layer: int | None = Field(
        None,
        description="image block to explain at (0-based); null: the model's default "
        "(GET /models: options.image_layer.default)",
    )
    steps: int = Field(DEFAULT_STEPS, description="integration steps (1..EXCLIP_MAX_STEPS)")
    precision: Precision = DEFAULT_PRECISION
    quadrature: QuadratureRule | None = Field(
        None,
        description="integration rule per tower (GET /models: options.quadrature); null: riemann, "
        "the authors' sum, or with a tolerance the default nested rule",
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description="relative error of the matrix (largest entry) to refine a nested rule to, in place "
        "of steps; null: use steps",
    )
    text_reference: TextReference | None = Field(
        None,
        description="text reference convention (GET /models: options.text_reference); null: "
        f"{DEFAULT_TEXT_REFERENCE}. aligned: the interactions sum to the score change they explain "
        "(completeness.expected); authors: the reference implementation's, summing to path_expected",
    )
    format: MatrixFormat = Field("json", description="interaction matrix as nested lists or base64 float32")
    wait: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="seconds POST /explain waits "
        "for the result (bounded by EXCLIP_WAIT_MAX_S); default: the bound",
    )

    @field_validator("text_layer", "image_layer", "steps", "tolerance", "wait", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any) -> Any:
        return _plain_number(value)


class ExplainJSON(ExplainOptions):
    image: str = Field(description="the image file (JPEG, PNG, ...) as base64; a data: URL is allowed")
    captions: list[str | CaptionIn] = Field(min_length=1)


@dataclass
class ExplainInput:
    """A parsed request, whichever content type it came in: typed selections, not yet checked against
    the model or the image (service.validation does that)."""

    image: bytes
    captions: list[CaptionRequest]
    options: ExplainOptions


class JobError(BaseModel):
    type: str
    message: str


class JobOut(BaseModel):
    """A job; ``result`` is ``{"captions": [CaptionResult, ...]}`` (see docs/contract.md) when done."""

    id: str
    status: JobStatus
    created_at: float
    model: str
    result: dict[str, Any] | None
    error: JobError | None


class ErrorOut(BaseModel):
    detail: str


class FieldErrorOut(BaseModel):
    """One entry of FastAPI's own validation answer (a path or query parameter of the wrong type or range)."""

    loc: list[str | int]
    msg: str
    type: str


class InvalidOut(BaseModel):
    """A 422 of a route with typed parameters: FastAPI's parameter checks answer a list of field errors,
    the route's own checks a message."""

    detail: str | list[FieldErrorOut]


# The 401 of every route that takes an API key (service.dependencies.api_key_owner).
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorOut,
        "description": "API keys are configured and the request has no valid 'Authorization: Bearer <key>'",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    }
}


class ModelsOut(BaseModel):
    models: list[dict[str, Any]]  # service.catalog.ModelInfo fields plus "options" (their ranges)
    default: str | None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every ``$ref`` replaced by its definition (for openapi_extra)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def form_schema() -> dict[str, Any]:
    """The multipart form of ``POST /explain``: image, captions, selections and the options model's fields."""

    def repeatable(description: str) -> dict[str, Any]:
        return {"type": "array", "items": {"type": "string"}, "description": description}

    def not_null(field: dict[str, Any]) -> dict[str, Any]:  # a form field is absent, never null
        variants = [v for v in field.get("anyOf", []) if v.get("type") != "null"]
        rest = {k: v for k, v in field.items() if k != "anyOf"}
        return {**rest, **variants[0]} if len(variants) == 1 else field

    return {
        "type": "object",
        "required": ["image", "caption"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"},
            "caption": repeatable("the caption; repeatable"),
            **{name: repeatable(syntax) for name, syntax in SELECTION_FIELDS.items()},
            **{name: not_null(field) for name, field in inline_schema(ExplainOptions)["properties"].items()},
        },
    }
