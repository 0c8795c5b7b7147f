"""Chance: a heatmap that is 1 on one patch drawn uniformly at random and 0 elsewhere.

The draw is seeded by the method's seed and the sample id (not by the batch), so results are the same
whatever the batch size or order.
"""

from __future__ import annotations

import zlib

import torch

from attribution.evaluation.grounding.methods.base import Batch, GroundingMethod
from attribution.models import LoadedModel


class RandomPatch(GroundingMethod):
    name = "random"
    layers = "none"

    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[torch.Tensor]]:
        rows, cols = loaded.grid
        out = []
        for sample in batch.samples:
            generator = torch.Generator().manual_seed(zlib.crc32(sample.id.encode()) ^ self.options.seed)
            maps = []
            for _ in sample.phrases:
                heatmap = torch.zeros(rows * cols)
                heatmap[int(torch.randint(rows * cols, (1,), generator=generator))] = 1.0
                maps.append(heatmap.view(rows, cols))
            out.append(maps)
        return out
