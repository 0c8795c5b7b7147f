"""The model catalogue: which models the live workers hold, the default one, and each option's range.

The API holds no weights; it knows the models from the workers' heartbeats, each model described by
``LoadedModel.describe()`` and read here into a typed ``ModelInfo``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from attribution.explainer import DEFAULT_STEPS, DEFAULT_TEXT_REFERENCE, TEXT_REFERENCES
from attribution.quadrature import (
    DEFAULT_NESTED_RULE,
    DEFAULT_RULE,
    NESTED_RULES,
    RULES,
    min_points,
    nested_sizes,
)
from service.schemas import MATRIX_FORMATS, PRECISIONS
from service.settings import Settings


class ModelInfo(BaseModel):
    """One served model, as a worker describes it (``LoadedModel.describe()``)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    name: str
    pretrained: str | None
    image_size: list[int]
    patch_size: list[int]  # (w, h), as LoadedModel.patch_size
    grid: list[int]
    context_length: int
    text_layers: int
    image_layers: int
    embed_dim: int
    device: str
    # The model card's default blocks (None: the last block), and what the model is.
    default_text_layer: int | None = None
    default_image_layer: int | None = None
    description: str | None = None
    demo: bool = False
    # What each result carries beside the matrix (absent from workers that predate them: none said)
    extra_columns: list[str] = []
    extra_rows: list[str] = []

    def layers(self, tower: str) -> int:
        """Blocks of the ``text`` or ``image`` tower."""
        return self.text_layers if tower == "text" else self.image_layers

    def default_layer(self, tower: str) -> int:
        """The block explained when a request names none: the model card's, else the last."""
        stated = self.default_text_layer if tower == "text" else self.default_image_layer
        return self.layers(tower) - 1 if stated is None else stated


def served_models(workers: list[dict[str, Any]]) -> dict[str, ModelInfo]:
    """Model name -> its ``ModelInfo``, over all live workers."""
    out: dict[str, ModelInfo] = {}
    for worker in workers:
        for info in worker.get("models", []):
            if info["name"] not in out:
                out[info["name"]] = ModelInfo.model_validate(info)
    return out


def default_model(served: dict[str, ModelInfo], settings: Settings) -> str | None:
    if settings.model in served:
        return settings.model
    return min(served) if served else None


def option_ranges(info: ModelInfo, settings: Settings) -> dict[str, Any]:
    """The accepted range of every option for one model (shown by GET /models)."""
    return {
        "text_layer": {"min": 0, "max": info.text_layers - 1, "default": info.default_layer("text")},
        "image_layer": {"min": 0, "max": info.image_layers - 1, "default": info.default_layer("image")},
        "steps": {"min": 1, "max": settings.max_steps, "default": DEFAULT_STEPS},
        "precision": list(PRECISIONS),
        "quadrature": {
            "rules": list(RULES),
            "default": DEFAULT_RULE,
            "nested": list(NESTED_RULES),
            "default_with_tolerance": DEFAULT_NESTED_RULE,
            "min_steps": {rule: min_points(rule) for rule in RULES},
            "note": "riemann is the authors' sum; with 10 steps it was measured off by 21 % of the largest "
            "entry on the demo model at layers 1/1, 12 % at its last blocks and 3.5 % on ViT-B-32 at 6/6; "
            "midpoint with 10 steps by 18 %, 0.2 % and 0.07 % (docs/method.md)",
        },
        "tolerance": {
            "min_exclusive": 0,
            "max_exclusive": 1,
            "default": None,
            "points": nested_sizes(),
            "note": "relative to the largest entry; the points per tower double from the first to the "
            "last of these until the estimate is below it; the result's integration says which",
        },
        "text_reference": {
            "conventions": list(TEXT_REFERENCES),
            "default": DEFAULT_TEXT_REFERENCE,
            "note": "aligned: the interactions sum to the score change (completeness.expected), measured "
            "within 2-3 % of it at 10 steps on the demo model, pointing unchanged; authors: the reference "
            "implementation's, whose sum misses it by 30 % there (docs/method.md)",
        },
        "format": list(MATRIX_FORMATS),
        "wait": {"min": 0, "max": settings.wait_max_s, "default": settings.wait_max_s},
        "max_captions": settings.max_captions,
        "max_selections": settings.max_selections,
        "caption_tokens": {"max": info.context_length, "note": "including start and end tokens"},
        "caption_chars": {"max": settings.max_caption_chars, "note": "checked before tokenising"},
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": settings.max_pixels,
    }
