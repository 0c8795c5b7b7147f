"""The one interface every grounding method implements, and the batch it is given.

A method turns a batch of samples into one heatmap per phrase, (rows, cols) on the model's patch grid,
higher meaning "this patch is what the phrase names". ``layers`` says which of the two cut points the
method depends on, so a benchmark over layer pairs computes each method once per distinct setting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from attribution.evaluation.grounding.samples import GroundingSample
from attribution.explainer import DEFAULT_STEPS, DEFAULT_TEXT_REFERENCE
from attribution.geometry import ImageGeometry
from attribution.images import preprocess
from attribution.models import LoadedModel

# Which cut points a method reads: both towers', the image tower's only, or none.
LAYER_USES = ("text+image", "image", "none")


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by the methods: interpolation ``steps`` (interactions, IG), ``seed`` (random)."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    text_reference: str = DEFAULT_TEXT_REFERENCE  # interactions only (attribution.explainer)


@dataclass(frozen=True, eq=False)  # identity: methods may memoise work per batch
class Batch:
    """Samples with their decoded images, preprocessed tensors (B, 3, H, W) and patch geometries."""

    samples: tuple[GroundingSample, ...]
    images: tuple[Image.Image, ...]
    tensors: torch.Tensor
    geometries: tuple[ImageGeometry, ...]

    @classmethod
    def build(cls, loaded: LoadedModel, samples: Sequence[GroundingSample]) -> Batch:
        images = tuple(s.load_image() for s in samples)
        prepared = [preprocess(image, loaded) for image in images]
        return cls(
            tuple(samples), images, torch.stack([t for t, _ in prepared]), tuple(g for _, g in prepared)
        )

    @property
    def n_phrases(self) -> int:
        return sum(len(s.phrases) for s in self.samples)


class GroundingMethod(ABC):
    """One way to point at a phrase's object."""

    name: str
    layers: str  # one of LAYER_USES

    def __init__(self, options: MethodOptions) -> None:
        self.options = options
        # Seconds the last ``heatmaps`` call would have taken on its own, where it reused work that
        # another method's call already did (None: its own wall time is its cost).
        self.last_cost_s: float | None = None

    @abstractmethod
    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[torch.Tensor]]:
        """Per sample, per phrase: a finite float32 heatmap (rows, cols) on the model's grid."""
