"""Second-order caption–image attributions for open_clip CLIP models (Moeller et al., TMLR 2025).

A plain library: no web framework, no queue. ``service`` builds on it, never the reverse.
"""

from attribution.decode import MAX_ASPECT_RATIO, decode_image, image_size
from attribution.errors import (
    AttributionError,
    CaptionError,
    CaptionTooLong,
    CaptionTooManyCharacters,
    EmptyCaption,
    InvalidImage,
    InvalidOption,
    InvalidSelection,
    ModelNotAvailable,
    SpecialTokenText,
    UnknownModel,
    UnsupportedModel,
)
from attribution.explainer import Completeness, Explainer, PairResult
from attribution.geometry import ImageGeometry, transform_geometry
from attribution.images import ModelInput, prepare_image, preprocess
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
from attribution.text import MAX_CAPTION_CHARS, Token, tokenize_caption

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_CAPTION_CHARS",
    "TINY_MODEL",
    "AttributionError",
    "Box",
    "CaptionError",
    "CaptionTooLong",
    "CaptionTooManyCharacters",
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
    "ModelInput",
    "ModelNotAvailable",
    "PairResult",
    "Span",
    "SpecialTokenText",
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
    "image_size",
    "load_model",
    "parse_indexed",
    "prepare_image",
    "preprocess",
    "selected_tokens",
    "span_heatmap",
    "tokenize_caption",
    "transform_geometry",
]
