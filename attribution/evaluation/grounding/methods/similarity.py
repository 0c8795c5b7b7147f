"""First-order machinery: the image–text cosine similarity as a function of the image tower's hidden
states entering one block, its gradient there, and the base of the methods built on it.

Reuses the engine's towers: ``ImageTower.hidden`` runs the blocks below the cut and ``ImageTower.tail``
gives the blocks above it as plain differentiable functions (``attribution.tail.embed``). The text is
embedded whole by the model (the first-order methods attribute the image side only). The image
reference is the engine's: an all-zero input image, run to the same cut.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attribution.evaluation.grounding.methods.base import Batch, GroundingMethod, MethodOptions
from attribution.models import LoadedModel
from attribution.tail import embed
from attribution.text import tokenize_caption
from attribution.towers import ImageTower


class ImageSimilarity:
    """cos(text embedding, image embedding) as a function of image hidden states at ``layer``."""

    def __init__(self, loaded: LoadedModel, layer: int) -> None:
        self.loaded = loaded
        self.tower = ImageTower(loaded.model)
        self.tower.check_layer(layer)
        self.layer = layer
        self.tail = self.tower.tail(layer, torch.float32, loaded.device)
        self._references: dict[tuple[int, int], Tensor] = {}

    def hidden(self, images: Tensor) -> Tensor:
        """Hidden states entering the cut, (B, 1 + patches, W), float32; the class token is row 0."""
        return self.tower.hidden(images.to(self.loaded.device), self.layer).float()

    def reference(self, image_shape: tuple[int, int]) -> Tensor:
        """The zero image's hidden states at the cut, (1 + patches, W); computed once per size."""
        if image_shape not in self._references:
            zeros = torch.zeros(1, 3, *image_shape, device=self.loaded.device)
            self._references[image_shape] = self.hidden(zeros)[0]
        return self._references[image_shape]

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings (K, E) of ``texts``, each tokenised as a caption of its own."""
        ids = torch.stack(
            [tokenize_caption(t, self.loaded, context_length=self.loaded.context_length)[0] for t in texts]
        )
        clip: Any = self.loaded.model  # open_clip's CLIP is untyped
        embedding: Tensor = clip.encode_text(ids.to(self.loaded.device)).float()
        unit: Tensor = embedding / embedding.norm(dim=-1, keepdim=True)
        return unit

    def embed(self, hidden: Tensor) -> Tensor:
        """Image embeddings (M, E) of hidden states (M, S, W) at the cut."""
        pool = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        embedding: Tensor = embed(self.tail, hidden, pool)
        return embedding

    def similarity(self, hidden: Tensor, texts: Tensor) -> Tensor:
        """cos similarity (K, M) of K unit text embeddings with the images of hidden states (M, S, W)."""
        with torch.no_grad():
            image = self.embed(hidden)
        cosine: Tensor = texts @ (image / image.norm(dim=-1, keepdim=True)).T
        return cosine

    def gradients(self, hidden: Tensor, texts: Tensor) -> Tensor:
        """∂cos(text_k, image(hidden_m)) / ∂hidden_m for K unit texts and M points → (K, M, S, W).

        One forward through the tail for all M points, then one backward per text (batched).
        """
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            image = self.embed(h)  # (M, E)
            norm = image.norm(dim=-1, keepdim=True)
            unit = image / norm
            cos = texts @ unit.T  # (K, M)
            # d cos / d image = (t − cos·u) / ‖image‖, per text and point.
            cotangents = (texts.unsqueeze(1) - cos.unsqueeze(-1) * unit.unsqueeze(0)) / norm.unsqueeze(0)
            (grads,) = torch.autograd.grad(image, h, cotangents.detach(), is_grads_batched=True)
        return grads


# What a first-order method scores the image against: the whole caption (one text for all its
# phrases) or each phrase on its own (one backward pass per phrase: the cost the interactions avoid).
TEXTS = ("caption", "phrase")


def texts_of(batch: Batch, text: str) -> list[list[str]]:
    """Per sample, the text scored against the image for each phrase (deduplicated by the caller)."""
    if text == "caption":
        return [[s.caption] for s in batch.samples]
    return [[s.phrase_text(i) for i in range(len(s.phrases))] for s in batch.samples]


class ImageGradientMethod(GroundingMethod):
    """A first-order attribution of the image tokens at the cut, for the caption or each phrase.

    Subclasses give ``prefix`` (the method's name is ``{prefix}-{text}``) and ``attributions``.
    """

    layers = "image"
    prefix: str

    def __init__(self, options: MethodOptions, text: str = "phrase") -> None:
        super().__init__(options)
        if text not in TEXTS:
            raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
        self.text = text
        self.name = f"{self.prefix}-{text}"

    @abstractmethod
    def attributions(
        self, similarity: ImageSimilarity, hidden: Tensor, texts: Tensor, batch: Batch
    ) -> Tensor:
        """Attributions (K, S) of one image's hidden states (S, W) for K unit text embeddings."""

    def heatmaps(
        self, loaded: LoadedModel, batch: Batch, text_layer: int, image_layer: int
    ) -> list[list[Tensor]]:
        similarity = ImageSimilarity(loaded, image_layer)
        hidden = similarity.hidden(batch.tensors)
        rows, cols = loaded.grid
        out = []
        for h, sample, texts in zip(hidden, batch.samples, texts_of(batch, self.text), strict=True):
            attributions = self.attributions(similarity, h, similarity.text_embeddings(texts), batch)
            maps = [a[1:].reshape(rows, cols).cpu() for a in attributions]  # the class token dropped
            out.append(maps * len(sample.phrases) if self.text == "caption" else maps)
        return out
