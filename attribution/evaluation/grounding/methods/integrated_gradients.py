"""First-order integrated gradients of the image–text similarity w.r.t. the image tokens at the cut.

For image hidden states x entering block ``image_layer`` and the reference r (the zero image at the
same cut), the attribution of image token p is Σ_j (x − r)[p, j] · mean_α ∂cos/∂x[p, j] (r + α(x − r)),
with the engine's interpolation points α ∈ {1, 1 − 1/N, …, 1/N}. Over all tokens (class token
included) it sums to cos(t, x) − cos(t, r) up to the Riemann error. The text is either the whole
caption (one text for all its phrases) or each phrase on its own, which needs one backward pass per
phrase: the cost the interactions avoid.
"""

from __future__ import annotations

from torch import Tensor

from attribution.evaluation.grounding.methods.base import Batch
from attribution.evaluation.grounding.methods.similarity import ImageGradientMethod, ImageSimilarity
from attribution.explainer import interpolation_points


def integrated_gradients(
    similarity: ImageSimilarity, hidden: Tensor, reference: Tensor, texts: Tensor, steps: int
) -> Tensor:
    """Attributions (K, S) of one image's hidden states (S, W) for K unit text embeddings."""
    alphas = interpolation_points(steps).to(dtype=hidden.dtype, device=hidden.device)
    delta = hidden - reference
    points = reference + alphas.view(-1, 1, 1) * delta  # (N, S, W)
    grads = similarity.gradients(points, texts)  # (K, N, S, W)
    return (grads.mean(dim=1) * delta).sum(dim=-1)


class IntegratedGradients(ImageGradientMethod):
    prefix = "ig"

    def attributions(
        self, similarity: ImageSimilarity, hidden: Tensor, texts: Tensor, batch: Batch
    ) -> Tensor:
        # The zero image at the cut: the same for every image of the batch (one size per batch).
        reference = similarity.reference((batch.tensors.shape[-2], batch.tensors.shape[-1]))
        return integrated_gradients(similarity, hidden, reference, texts, self.options.steps)
