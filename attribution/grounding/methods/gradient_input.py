"""First-order gradient × input of the image–text similarity w.r.t. the image tokens at the cut.

The attribution of image token p is Σ_j x[p, j] · ∂cos/∂x[p, j] at the input's own hidden states x
entering block ``image_layer`` (Captum's ``InputXGradient``: no reference, one gradient). The text is
the whole caption or each phrase alone, as for integrated gradients.
"""

from __future__ import annotations

from torch import Tensor

from attribution.grounding.methods.base import Batch, GroundingMethod, MethodOptions
from attribution.grounding.methods.integrated_gradients import TEXTS, texts_of
from attribution.grounding.methods.similarity import ImageSimilarity
from attribution.models import LoadedModel


class GradientInput(GroundingMethod):
    layers = "image"

    def __init__(self, options: MethodOptions, text: str = "phrase") -> None:
        super().__init__(options)
        if text not in TEXTS:
            raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
        self.text = text
        self.name = f"grad-input-{text}"

    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[Tensor]]:
        similarity = ImageSimilarity(loaded, image_layer)
        hidden = similarity.hidden(batch.tensors)
        rows, cols = loaded.grid
        out = []
        for h, sample, texts in zip(hidden, batch.samples, texts_of(batch, self.text), strict=True):
            grads = similarity.gradients(h.unsqueeze(0), similarity.text_embeddings(texts))[:, 0]  # (K, S, W)
            maps = [a[1:].reshape(rows, cols).cpu() for a in (grads * h).sum(dim=-1)]
            out.append(maps * len(sample.phrases) if self.text == "caption" else maps)
        return out
