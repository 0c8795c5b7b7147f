"""Second-order caption–image attributions for open_clip CLIP models (Moeller et al., TMLR 2025).

A plain library: no web framework, no queue. ``service`` builds on it, never the reverse.
"""

from attribution.errors import (
    AttributionError,
    CaptionError,
    CaptionTooLong,
    EmptyCaption,
    InvalidImage,
    InvalidOption,
    InvalidSelection,
    ModelNotAvailable,
    UnknownModel,
    UnsupportedModel,
)
from attribution.explainer import Completeness, Explainer, PairResult
from attribution.images import ImageGeometry, decode_image, preprocess
from attribution.models import TINY_MODEL, LoadedModel, load_model
from attribution.pipeline import ExplainRequest, Explanation, explain_requests
from attribution.selections import (
    Box,
    Span,
    TokenRange,
    box_patch_weights,
    box_token_scores,
    check_box,
    check_selection,
    parse_indexed,
    selected_tokens,
    span_heatmap,
)
from attribution.text import Token, tokenize_caption

__all__ = [
    "TINY_MODEL",
    "AttributionError",
    "Box",
    "CaptionError",
    "CaptionTooLong",
    "Completeness",
    "EmptyCaption",
    "ExplainRequest",
    "Explainer",
    "Explanation",
    "ImageGeometry",
    "InvalidImage",
    "InvalidOption",
    "InvalidSelection",
    "LoadedModel",
    "ModelNotAvailable",
    "PairResult",
    "Span",
    "Token",
    "TokenRange",
    "UnknownModel",
    "UnsupportedModel",
    "box_patch_weights",
    "box_token_scores",
    "check_box",
    "check_selection",
    "decode_image",
    "explain_requests",
    "load_model",
    "parse_indexed",
    "preprocess",
    "selected_tokens",
    "span_heatmap",
    "tokenize_caption",
]
