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

from attribution.explainer import interpolation_points
from attribution.grounding.methods.base import Batch, GroundingMethod, MethodOptions
from attribution.grounding.methods.similarity import ImageSimilarity
from attribution.models import LoadedModel

TEXTS = ("caption", "phrase")


def texts_of(batch: Batch, text: str) -> list[list[str]]:
    """Per sample, the text scored against the image for each phrase (deduplicated by the caller)."""
    if text == "caption":
        return [[s.caption] for s in batch.samples]
    return [[s.phrase_text(i) for i in range(len(s.phrases))] for s in batch.samples]


def integrated_gradients(
    similarity: ImageSimilarity, hidden: Tensor, reference: Tensor, texts: Tensor, steps: int
) -> Tensor:
    """Attributions (K, S) of one image's hidden states (S, W) for K unit text embeddings."""
    alphas = interpolation_points(steps).to(dtype=hidden.dtype, device=hidden.device)
    delta = hidden - reference
    points = reference + alphas.view(-1, 1, 1) * delta  # (N, S, W)
    grads = similarity.gradients(points, texts)  # (K, N, S, W)
    return (grads.mean(dim=1) * delta).sum(dim=-1)


class IntegratedGradients(GroundingMethod):
    layers = "image"

    def __init__(self, options: MethodOptions, text: str = "phrase") -> None:
        super().__init__(options)
        if text not in TEXTS:
            raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
        self.text = text
        self.name = f"ig-{text}"

    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[Tensor]]:
        similarity = ImageSimilarity(loaded, image_layer)
        hidden = similarity.hidden(batch.tensors)
        reference = similarity.reference((batch.tensors.shape[-2], batch.tensors.shape[-1]))
        rows, cols = loaded.grid
        out = []
        for h, sample, texts in zip(hidden, batch.samples, texts_of(batch, self.text), strict=True):
            attributions = integrated_gradients(
                similarity, h, reference, similarity.text_embeddings(texts), self.options.steps
            )
            maps = [a[1:].reshape(rows, cols).cpu() for a in attributions]
            out.append(maps * len(sample.phrases) if self.text == "caption" else maps)
        return out
