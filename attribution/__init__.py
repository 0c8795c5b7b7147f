"""Second-order caption–image attributions for open_clip CLIP models (Moeller et al., TMLR 2025).

A plain library: no web framework, no queue. ``service`` builds on it, never the reverse.
"""

import importlib

# Names re-exported from the submodules, imported on first use so that importing one submodule does
# not import the whole library.
_EXPORTS = {
    "attribution.errors": [
        "AttributionError", "CaptionError", "CaptionTooLong", "EmptyCaption", "InvalidImage",
        "InvalidOption", "InvalidSelection", "ModelNotAvailable", "UnknownModel", "UnsupportedModel",
    ],
    "attribution.explainer": ["Completeness", "Explainer", "PairResult"],
    "attribution.images": ["ImageGeometry", "decode_image", "preprocess"],
    "attribution.models": ["TINY_MODEL", "LoadedModel", "load_model"],
    "attribution.pipeline": ["ExplainRequest", "Explanation", "explain_requests"],
    "attribution.selections": ["Box", "Span", "TokenRange", "box_token_scores", "span_heatmap"],
    "attribution.text": ["Token", "tokenize_caption"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'attribution' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
