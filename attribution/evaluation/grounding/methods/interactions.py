"""Second-order caption–image interactions (the engine), read out per phrase or for the whole caption.

One engine computation per caption gives the token × patch matrix; a phrase's heatmap is the sum of the
rows of its tokens (tokens whose characters overlap the phrase span), so every phrase of a caption comes
from the same computation. ``target="caption"`` sums all rows (SOT … EOT) instead: the same map for
every phrase of the caption, which cannot tell its objects apart.

Both readouts come from the same computation, so it runs once per batch, layer pair and step count
(memoised per ``Batch`` object); the second readout reports the first's time as its cost.
"""

from __future__ import annotations

import time
import weakref

import torch

from attribution.evaluation.grounding.methods.base import Batch, GroundingMethod, MethodOptions
from attribution.models import LoadedModel
from attribution.pipeline import ExplainRequest, explain_requests
from attribution.selections import Span

TARGETS = ("phrase", "caption")

# Batch -> {(model id, text layer, image layer, steps, text reference): ({target: heatmaps}, seconds)}
_Heatmaps = dict[str, list[list[torch.Tensor]]]  # target -> per sample, per phrase
_MEMO: weakref.WeakKeyDictionary[Batch, dict[tuple[int, int, int, int, str], tuple[_Heatmaps, float]]] = (
    weakref.WeakKeyDictionary()
)


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
        memo = _MEMO.setdefault(batch, {})
        key = (id(loaded.model), text_layer, image_layer, self.options.steps, self.options.text_reference)
        if key in memo:
            maps, seconds = memo[key]
            self.last_cost_s = seconds
        else:
            start = time.perf_counter()
            maps = _readouts(loaded, batch, text_layer, image_layer, self.options)
            memo[key] = maps, time.perf_counter() - start
            self.last_cost_s = None
        return maps[self.target]


def _readouts(
    loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int, options: MethodOptions
) -> dict[str, list[list[torch.Tensor]]]:
    """Both targets' heatmaps from one engine call over the batch (one computation per caption)."""
    requests = [
        ExplainRequest(image, [sample.caption], [[Span(*p.span) for p in sample.phrases]])
        for image, sample in zip(batch.images, batch.samples, strict=True)
    ]
    explained = explain_requests(
        loaded,
        requests,
        text_layer=text_layer,
        image_layer=image_layer,
        steps=options.steps,
        text_reference=options.text_reference,
    )
    out: dict[str, list[list[torch.Tensor]]] = {"phrase": [], "caption": []}
    for (explanation,), sample in zip(explained, batch.samples, strict=True):
        phrase_maps = []
        for s in explanation.selections:
            assert s.heatmap is not None  # span selections always carry a heatmap
            phrase_maps.append(s.heatmap.float())
        out["phrase"].append(phrase_maps)
        whole = explanation.result.interactions.sum(dim=0).float()
        out["caption"].append([whole] * len(sample.phrases))
    return out
