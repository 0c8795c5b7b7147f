"""From images and captions to JSON-ready explanations, many requests in one engine call.

This is what the service's worker calls: it preprocesses each image once (keeping its geometry),
tokenises each caption with character offsets, checks every selection before any compute, runs one
``Explainer.explain_tokens`` over all (image, caption) pairs of the batch and evaluates the selections.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from attribution.decode import MAX_ASPECT_RATIO
from attribution.explainer import (
    DEFAULT_PRECISION,
    DEFAULT_STEPS,
    DEFAULT_TEXT_REFERENCE,
    Completeness,
    Explainer,
    Integration,
    PairResult,
)
from attribution.geometry import ImageGeometry
from attribution.images import ModelInput, preprocess
from attribution.memory import DEFAULT_MEMORY_FRACTION
from attribution.models import LoadedModel
from attribution.quadrature import DEFAULT_RULE
from attribution.selections import (
    Box,
    Selection,
    box_token_scores,
    check_selection,
    selected_tokens,
    selection_from_dict,
    span_heatmap,
)
from attribution.text import MAX_CAPTION_CHARS, Token, tokenize_caption

MATRIX_FORMATS = ("json", "base64")


@dataclass
class ExplainRequest:
    """One image with its captions; ``selections[i]`` are the selections of caption ``i``.

    ``image`` is a decoded image, or one already prepared for this model (``images.prepare_image``:
    decoded at the size the model needs, so a batch holds model inputs rather than full images).
    """

    image: Image.Image | ModelInput
    captions: list[str]
    selections: list[list[Selection]] = field(default_factory=list)

    def selections_of(self, caption_index: int) -> list[Selection]:
        return self.selections[caption_index] if caption_index < len(self.selections) else []


@dataclass(frozen=True)
class SelectionResult:
    """A span or token range with its patch heatmap, or a box with its per-token scores."""

    selection: Selection
    heatmap: torch.Tensor | None = None  # (rows, cols)
    token_scores: torch.Tensor | None = None  # (tokens,)
    tokens: list[int] | None = None  # token indices a span or token range selects

    def to_dict(self) -> dict[str, Any]:
        """The selection's own JSON (``Span.to_dict`` ...) with its box's token scores, or the tokens a
        span or token range selects and its heatmap."""
        if isinstance(self.selection, Box):
            assert self.token_scores is not None  # a box's result always carries token scores
            return {**self.selection.to_dict(), "token_scores": self.token_scores.tolist()}
        assert self.heatmap is not None  # a span's or token range's result always carries a heatmap
        return {**self.selection.to_dict(), "tokens": self.tokens, "heatmap": self.heatmap.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionResult:
        """The inverse of ``to_dict``."""
        selection = selection_from_dict(d)
        if isinstance(selection, Box):
            return cls(selection, token_scores=torch.tensor(d["token_scores"], dtype=torch.float32))
        heatmap = torch.tensor(d["heatmap"], dtype=torch.float32)
        return cls(selection, heatmap=heatmap, tokens=d.get("tokens"))


@dataclass(frozen=True)
class Explanation:
    """The explanation of one caption of one request, with everything needed to draw it."""

    caption: str
    model_name: str
    pretrained: str | None
    options: dict[str, Any]
    tokens: list[Token]
    geometry: ImageGeometry
    result: PairResult
    selections: list[SelectionResult]

    def to_dict(self, matrix_format: str = "json") -> dict[str, Any]:
        """The JSON result (see docs/contract.md); the matrix as nested lists or base64 float32 LE."""
        if matrix_format not in MATRIX_FORMATS:
            raise ValueError(f"matrix_format must be one of {MATRIX_FORMATS}, got {matrix_format!r}")
        geometry = self.geometry.to_dict()
        # Only for another rule or a tolerance: the default's keys stay as they were.
        integration = self.result.integration
        if integration is not None and integration.rule == DEFAULT_RULE and integration.tolerance is None:
            integration = None
        return {
            "caption": self.caption,
            "model": {"name": self.model_name, "pretrained": self.pretrained},
            "options": dict(self.options),
            "tokens": [t.to_dict() for t in self.tokens],
            "image": {k: v for k, v in geometry.items() if k != "grid"},  # the grid has its own key
            "grid": geometry["grid"],
            "interactions": encode_matrix(self.result.interactions, matrix_format),
            # the class-token column under its old key too (null for a tower without a class token)
            "cls": None if self.result.cls is None else self.result.cls.tolist(),
            "extra_columns": {name: v.tolist() for name, v in self.result.extra_columns.items()},
            "extra_rows": {
                name: encode_matrix(v, matrix_format) for name, v in self.result.extra_rows.items()
            },
            "corner": self.result.corner,
            "score": self.result.score,
            "completeness": asdict(self.result.completeness),
            "selections": [s.to_dict() for s in self.selections],
        } | ({} if integration is None else {"integration": asdict(integration)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Explanation:
        """The inverse of ``to_dict`` (either matrix format). Keys it does not define, such as the
        service's ``timings``, are ignored. Tokens come back without vocabulary ids (``id`` None)."""
        cls_column = None if d["cls"] is None else torch.tensor(d["cls"], dtype=torch.float32)
        # Results written before the extra rows and columns existed had only ``cls``.
        columns = d.get("extra_columns", {} if cls_column is None else {"cls": d["cls"]})
        result = PairResult(
            interactions=decode_matrix(d["interactions"]),
            cls=cls_column,
            extra_columns={k: torch.tensor(v, dtype=torch.float32) for k, v in columns.items()},
            extra_rows={k: decode_matrix(v) for k, v in d.get("extra_rows", {}).items()},
            corner=float(d.get("corner", 0.0)),
            score=float(d["score"]),
            completeness=Completeness(**d["completeness"]),
            integration=Integration(**d["integration"]) if d.get("integration") else None,
        )
        return cls(
            caption=d["caption"],
            model_name=d["model"]["name"],
            pretrained=d["model"]["pretrained"],
            options=dict(d["options"]),
            tokens=[Token.from_dict(t) for t in d["tokens"]],
            geometry=ImageGeometry.from_dict({**d["image"], "grid": d["grid"]}),
            result=result,
            selections=[SelectionResult.from_dict(s) for s in d["selections"]],
        )


def encode_matrix(matrix: torch.Tensor, matrix_format: str) -> Any:
    """Nested lists, or ``{"encoding": "base64-float32-le", "shape", "data"}``."""
    if matrix_format == "json":
        return matrix.tolist()
    data = matrix.detach().cpu().numpy().astype("<f4", copy=False).tobytes()
    return {
        "encoding": "base64-float32-le",
        "shape": list(matrix.shape),
        "data": base64.b64encode(data).decode(),
    }


def decode_matrix(encoded: Any) -> torch.Tensor:
    """The inverse of :func:`encode_matrix` (either form)."""
    if isinstance(encoded, dict):
        array = np.frombuffer(base64.b64decode(encoded["data"]), dtype="<f4").reshape(encoded["shape"])
        return torch.from_numpy(array.copy())
    return torch.tensor(encoded, dtype=torch.float32)


def _evaluate(
    selection: Selection, interactions: torch.Tensor, tokens: list[Token], geometry: ImageGeometry
) -> SelectionResult:
    if isinstance(selection, Box):
        return SelectionResult(selection, token_scores=box_token_scores(interactions, geometry, selection))
    heatmap = span_heatmap(interactions, tokens, selection)
    return SelectionResult(selection, heatmap=heatmap, tokens=selected_tokens(tokens, selection))


@dataclass(frozen=True)
class _Pair:
    """One (image, caption) pair of a batch, ready for the engine."""

    request: int  # index into the requests (and their model inputs)
    caption: str
    ids: torch.Tensor
    tokens: list[Token]
    selections: list[Selection]


def _model_input(image: Image.Image | ModelInput, loaded: LoadedModel, max_aspect_ratio: float) -> ModelInput:
    if isinstance(image, ModelInput):
        return image
    return ModelInput(*preprocess(image, loaded, max_aspect_ratio=max_aspect_ratio))


def explain_requests(
    loaded: LoadedModel,
    requests: Sequence[ExplainRequest],
    *,
    text_layer: int | None = None,
    image_layer: int | None = None,
    steps: int = DEFAULT_STEPS,
    precision: str = DEFAULT_PRECISION,
    quadrature: str | None = None,
    tolerance: float | None = None,
    text_reference: str = DEFAULT_TEXT_REFERENCE,
    max_caption_chars: int = MAX_CAPTION_CHARS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> list[list[Explanation]]:
    """Explain every caption of every request in one engine call; one list per request.

    Layers default to the model's default blocks (the last unless its model card says otherwise).
    Bad captions, options or selections raise an ``AttributionError`` subclass before anything is
    computed. The two limits are those of
    ``tokenize_caption`` and ``preprocess`` (for images not yet prepared). The engine's passes use
    at most ``memory_fraction`` of the device's free memory (``attribution.memory``). ``quadrature`` and
    ``tolerance`` are the ``Explainer``'s (``attribution.quadrature``), and so is ``text_reference``.
    """
    text_layer = loaded.default_text_layer if text_layer is None else text_layer
    image_layer = loaded.default_image_layer if image_layer is None else image_layer
    explainer = Explainer(
        loaded.model,
        loaded.tokenizer,
        text_layer,
        image_layer,
        steps,
        precision,
        memory_fraction=memory_fraction,
        quadrature=quadrature,
        tolerance=tolerance,
        text_reference=text_reference,
    )

    inputs = [_model_input(request.image, loaded, max_aspect_ratio) for request in requests]
    pairs: list[_Pair] = []
    for r, (request, model_input) in enumerate(zip(requests, inputs, strict=True)):
        for c, caption in enumerate(request.captions):
            ids, tokens = tokenize_caption(
                caption, loaded, context_length=loaded.context_length, max_chars=max_caption_chars
            )
            selections = request.selections_of(c)
            for selection in selections:
                check_selection(selection, tokens, model_input.geometry)
            pairs.append(_Pair(r, caption, ids, tokens, selections))

    if not pairs:
        return [[] for _ in requests]
    images = torch.stack([inputs[p.request].tensor for p in pairs])
    results = explainer.explain_tokens(images, [p.ids for p in pairs])

    # The rule, points and tolerance are in each result's ``integration``.
    options: dict[str, Any] = {
        "text_layer": text_layer,
        "image_layer": image_layer,
        "steps": steps,
        "precision": precision,
    }
    if text_reference != DEFAULT_TEXT_REFERENCE:  # the default's keys stay as they were
        options["text_reference"] = text_reference
    out: list[list[Explanation]] = [[] for _ in requests]
    for pair, result in zip(pairs, results, strict=True):
        geometry, interactions = inputs[pair.request].geometry, result.interactions
        out[pair.request].append(
            Explanation(
                caption=pair.caption,
                model_name=loaded.name,
                pretrained=loaded.pretrained,
                options=options,
                tokens=pair.tokens,
                geometry=geometry,
                result=result,
                selections=[_evaluate(s, interactions, pair.tokens, geometry) for s in pair.selections],
            )
        )
    return out
