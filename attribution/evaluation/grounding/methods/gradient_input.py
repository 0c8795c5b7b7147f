"""First-order gradient × input of the image–text similarity w.r.t. the image tokens at the cut.

The attribution of image token p is Σ_j x[p, j] · ∂cos/∂x[p, j] at the input's own hidden states x
entering block ``image_layer`` (Captum's ``InputXGradient``: no reference, one gradient). The text is
the whole caption or each phrase alone, as for integrated gradients.
"""

from __future__ import annotations

from torch import Tensor

from attribution.evaluation.grounding.methods.base import Batch
from attribution.evaluation.grounding.methods.similarity import ImageGradientMethod, ImageSimilarity


class GradientInput(ImageGradientMethod):
    prefix = "grad-input"

    def attributions(
        self, similarity: ImageSimilarity, hidden: Tensor, texts: Tensor, batch: Batch
    ) -> Tensor:
        grads = similarity.gradients(hidden.unsqueeze(0), texts)[:, 0]  # (K, S, W)
        return (grads * hidden).sum(dim=-1)
