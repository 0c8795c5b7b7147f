"""A grounding benchmark for caption–image explanations (after Moeller et al., Section 4.2).

Samples (:mod:`.samples`; readers :mod:`.coco`, :mod:`.flickr30k`, and scenes via ``from_scene``),
metrics (:mod:`.metrics`: pointing game, energy in box), methods behind one interface
(:mod:`.methods`), the runner (:mod:`.benchmark`), tables and figures (:mod:`.report`) and the command
line (``python -m attribution.evaluation.grounding``).
"""

from attribution.evaluation.grounding.benchmark import BenchmarkResult, run_benchmark
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.methods import (
    METHODS,
    Batch,
    GroundingMethod,
    MethodOptions,
    create_method,
)
from attribution.evaluation.grounding.metrics import POINTING_RULES, energy_in_box, pointing_hit, union_cover
from attribution.evaluation.grounding.samples import GroundingSample, Phrase, from_scene

__all__ = [
    "METHODS",
    "POINTING_RULES",
    "AnnotationError",
    "Batch",
    "BenchmarkResult",
    "GroundingMethod",
    "GroundingSample",
    "MethodOptions",
    "Phrase",
    "create_method",
    "energy_in_box",
    "from_scene",
    "pointing_hit",
    "run_benchmark",
    "union_cover",
]
