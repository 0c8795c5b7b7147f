"""Second-order caption–image interactions (the engine), read out per phrase or for the whole caption.

One engine computation per caption gives the token × patch matrix; a phrase's heatmap is the sum of the
rows of its tokens (tokens whose characters overlap the phrase span), so every phrase of a caption comes
from the same computation. ``target="caption"`` sums all rows (SOT … EOT) instead: the same map for
every phrase of the caption, which cannot tell its objects apart.
"""

from __future__ import annotations

import torch

from attribution.grounding.methods.base import Batch, GroundingMethod, MethodOptions
from attribution.models import LoadedModel
from attribution.pipeline import ExplainRequest, explain_requests
from attribution.selections import Span

TARGETS = ("phrase", "caption")


class Interactions(GroundingMethod):
    layers = "text+image"

    def __init__(self, options: MethodOptions, target: str = "phrase") -> None:
        super().__init__(options)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.name = "interactions" if target == "phrase" else "interactions-caption"

    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[torch.Tensor]]:
        spans = [[Span(*p.span) for p in s.phrases] for s in batch.samples]
        requests = [
            ExplainRequest(image, [sample.caption], [selections if self.target == "phrase" else []])
            for image, sample, selections in zip(batch.images, batch.samples, spans, strict=True)
        ]
        explained = explain_requests(
            loaded, requests, text_layer=text_layer, image_layer=image_layer, steps=self.options.steps
        )
        out = []
        for (explanation,), sample in zip(explained, batch.samples, strict=True):
            if self.target == "phrase":
                out.append([s.heatmap.float() for s in explanation.selections])
            else:
                whole = explanation.result.interactions.sum(dim=0).float()
                out.append([whole] * len(sample.phrases))
        return out
