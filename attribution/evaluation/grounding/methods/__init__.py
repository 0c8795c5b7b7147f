"""Grounding methods behind one interface (:class:`GroundingMethod`), registered by name.

``METHODS`` maps each name to a constructor taking ``MethodOptions``; ``create_method`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from attribution.errors import InvalidOption
from attribution.evaluation.grounding.methods.base import LAYER_USES, Batch, GroundingMethod, MethodOptions
from attribution.evaluation.grounding.methods.gradient_input import GradientInput
from attribution.evaluation.grounding.methods.integrated_gradients import IntegratedGradients
from attribution.evaluation.grounding.methods.interactions import Interactions
from attribution.evaluation.grounding.methods.random_patch import RandomPatch

METHODS: dict[str, Callable[[MethodOptions], GroundingMethod]] = {
    "interactions": partial(Interactions, target="phrase"),
    "interactions-caption": partial(Interactions, target="caption"),
    "random": RandomPatch,
    "ig-caption": partial(IntegratedGradients, text="caption"),
    "ig-phrase": partial(IntegratedGradients, text="phrase"),
    "grad-input-caption": partial(GradientInput, text="caption"),
    "grad-input-phrase": partial(GradientInput, text="phrase"),
}


def create_method(name: str, options: MethodOptions | None = None) -> GroundingMethod:
    if name not in METHODS:
        raise InvalidOption(f"unknown grounding method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](options or MethodOptions())


__all__ = ["LAYER_USES", "METHODS", "Batch", "GroundingMethod", "MethodOptions", "create_method"]
