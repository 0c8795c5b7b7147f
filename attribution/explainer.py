"""Second-order token × patch interactions (Moeller et al., TMLR 2025), factorised.

The reference builds the full (tokens·width) × (patches·width) product of integrated Jacobians. The
sum over both hidden dimensions separates, so

    A[s, p] = Σ_k T[k, s] · I[k, p]

where ``T[:, s]`` is the embedding's integrated directional derivative along the text delta
restricted to token ``s`` (likewise ``I`` for image tokens). Each column is a Jacobian-vector product
averaged over the interpolation points (computed in :mod:`attribution.tail`); ``docs/method.md`` in
this repository gives the derivation, the conventions of the reference (``exclip`` 1.1) that this
module reproduces, the completeness finding and the one deliberate difference (the number of points).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from attribution.errors import InvalidOption
from attribution.memory import DEFAULT_MEMORY_FRACTION, tangent_budget, widest_mlp
from attribution.tail import Tail, dense_token_vjps, embed, token_jvps
from attribution.text import Tokenizer, tokenize_caption
from attribution.tf32 import exact_float32
from attribution.towers import ImageTower, TextTower

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Per-model cache of the references' hidden states and embeddings; they depend only on the weights.
_REFERENCE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], dict[str, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Completeness:
    """How well the interactions add up, all on the cosine scale (divided by ‖h(t)‖·‖g(x)‖).

    ``total``: the sum of all interactions (CLS column included). ``expected``:
    ``(h(t)−h(r_t))·(g(x)−g(r_x))``, the value the method explains; ``gap = total − expected``.

    The reference's conventions pool every interpolation point at the *input's* EOT position but the
    text reference at its own (position 2), so the path integral ends at the reference's hidden state
    pooled at the input's EOT, not at ``h(r_t)``. ``path_expected`` is the value the sum converges to
    as the steps grow; ``integration_gap = total − path_expected`` is the Riemann-sum error alone and
    shrinks as N grows, while ``gap`` tends to ``path_expected − expected`` (zero for a one-token
    caption, whose EOT is at position 2 too).
    """

    total: float
    expected: float
    gap: float
    path_expected: float
    integration_gap: float


@dataclass(frozen=True)
class PairResult:
    """The explanation of one (image, caption) pair.

    ``interactions``: float32 (tokens SOT…EOT, grid rows, grid cols), on the cosine scale.
    ``cls``: the image class-token column (tokens,). ``score``: cosine similarity of the pair.
    """

    interactions: Tensor
    cls: Tensor
    score: float
    completeness: Completeness


@dataclass(frozen=True)
class _Side:
    """One tower's factor for one input: ``factor`` (E, S), embeddings in float32."""

    factor: Tensor
    embedding: Tensor  # (E,) of the input
    reference_embedding: Tensor  # (E,)
    path_start: Tensor  # (E,) the reference's hidden states pooled as the input is


def interpolation_points(steps: int) -> Tensor:
    """α ∈ {1, 1 − 1/N, …, 1/N}: the input is included, the reference is not.

    The reference computes these with a float ``arange`` that yields N + 1 points for some N (49, for
    one); here there are always exactly N.
    """
    return 1.0 - torch.arange(steps, dtype=torch.float64) / steps


class Explainer:
    """Explains open_clip CLIP models by second-order caption–image interactions.

    ``model`` is an open_clip ``CLIP`` with a ViT image tower (eval mode), ``tokenizer`` its open_clip
    tokenizer. ``text_layer``/``image_layer`` choose the block whose input is attributed (``None``,
    the default: each tower's last block), ``steps`` the number N of interpolation points,
    ``precision`` the dtype of the derivative computation (``float32``, ``bfloat16`` or ``float16``).
    ``points``, if given, are explicit interpolation points α in place of :func:`interpolation_points`
    (as the reference's ``N`` accepts a tensor), e.g. to reproduce its N + 1 points exactly.

    Each distinct image and caption of a call is computed on its own, so a pair's result does not
    depend on what else is in the batch (bit for bit, on one device and thread count).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        text_layer: int | None = None,
        image_layer: int | None = None,
        steps: int = 10,
        precision: str = "float32",
        scale_cos: bool = False,
        max_tangents: int | None = None,
        *,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
        points: Sequence[float] | Tensor | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text = TextTower(model)
        self.image = ImageTower(model)
        text_layer = self.text.n_layers - 1 if text_layer is None else text_layer
        image_layer = self.image.n_layers - 1 if image_layer is None else image_layer
        self.text.check_layer(text_layer)
        self.image.check_layer(image_layer)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidOption(f"steps must be an integer ≥ 1, got {steps!r}")
        if precision not in PRECISIONS:
            raise InvalidOption(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.text_layer = text_layer
        self.image_layer = image_layer
        self.steps = steps
        self.precision = precision
        self.scale_cos = scale_cos
        if max_tangents is not None and max_tangents < 1:
            raise InvalidOption(f"max_tangents must be ≥ 1, got {max_tangents!r}")
        if not 0 < memory_fraction <= 1:
            raise InvalidOption(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        # Tangent rows per pass: fixed, or (None) sized from the device's free memory before each pass.
        self.max_tangents = max_tangents
        self.memory_fraction = memory_fraction
        self.mlp_width = widest_mlp(model)  # a tangent row's cost, for tangent_budget
        self.points = interpolation_points(steps) if points is None else _explicit_points(points)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    # ----------------------------------------------------------------------------------- public

    def tokenize(self, captions: Sequence[str]) -> list[Tensor]:
        """Token ids of each caption (SOT … EOT); raises for empty or too long captions."""
        context = self.text.context_length
        return [tokenize_caption(c, self.tokenizer, context_length=context)[0] for c in captions]

    @torch.no_grad()
    def explain(self, images: Tensor, captions: Sequence[str]) -> list[PairResult]:
        """Explain B pairs: ``images`` (B, 3, H, W) preprocessed, ``captions`` B strings."""
        return self.explain_tokens(images, self.tokenize(captions))

    @torch.no_grad()
    @exact_float32()
    def explain_tokens(self, images: Tensor, tokens: Sequence[Tensor]) -> list[PairResult]:
        """Explain B pairs given token ids per caption (SOT … EOT, padding optional).

        Repeated images or captions are computed once: the image side is shared by all captions of an
        image and the text side by all images of a caption. Float32 is IEEE float32 throughout, TF32
        off (:mod:`attribution.tf32`); the caller's backend settings are restored afterwards.
        """
        if images.dim() != 4 or images.shape[0] != len(tokens):
            raise InvalidOption(
                f"expected images (B, 3, H, W) and B captions, got {tuple(images.shape)} and {len(tokens)}"
            )
        image_of, unique_images = _unique([img.contiguous().cpu().numpy().tobytes() for img in images])
        # The text mask is causal: rows after EOT (padding) change nothing that is pooled, so cut them.
        tokens = [t[: int(t.argmax()) + 1] for t in tokens]
        text_of, unique_texts = _unique([tuple(t.tolist()) for t in tokens])
        refs = self._references((images.shape[-2], images.shape[-1]))
        image_tails = self._tails(self.image, self.image_layer)
        text_tails = self._tails(self.text, self.text_layer)
        image_sides = [self._image_side(images[i], refs, image_tails) for i in unique_images]
        text_sides = [self._text_side(tokens[i], refs, text_tails) for i in unique_texts]
        grid_h, grid_w = self.image.visual.grid_size
        grid = (int(grid_h), int(grid_w))
        pairs = zip(text_of, image_of, strict=True)
        return [self._combine(text_sides[t], image_sides[i], grid) for t, i in pairs]

    # ---------------------------------------------------------------------------------- sides

    def _references(self, image_shape: tuple[int, int]) -> dict[str, Tensor]:
        """Hidden states of the text and image references at the cut (cached per model)."""
        cache = _REFERENCE_CACHE.setdefault(self.model, {})
        key = (self.text_layer, self.image_layer, self.device, image_shape)
        if key not in cache:
            ref_tokens = torch.zeros(1, self.text.context_length, dtype=torch.long, device=self.device)
            ref_tokens[0, 0] = self.tokenizer.sot_token_id
            ref_tokens[0, 2] = self.tokenizer.eot_token_id  # [SOT, 0, EOT, 0, …] as in the reference
            ref_image = torch.zeros(1, 3, *image_shape, device=self.device)
            cache[key] = {
                "text": self.text.hidden(ref_tokens, self.text_layer)[0].float(),
                "text_pool": self.text.pool_index(ref_tokens)[0],
                "image": self.image.hidden(ref_image, self.image_layer)[0].float(),
            }
        return cache[key]

    def _tails(self, tower: TextTower | ImageTower, layer: int) -> tuple[Tail, Tail]:
        """The tail in the derivative's precision, and in float32 for embeddings and completeness."""
        exact = tower.tail(layer, torch.float32, self.device)
        return (exact if self.dtype == torch.float32 else tower.tail(layer, self.dtype, self.device)), exact

    def _image_side(self, image: Tensor, refs: dict[str, Tensor], tails: tuple[Tail, Tail]) -> _Side:
        hidden = self.image.hidden(image.unsqueeze(0).to(self.device), self.image_layer).float()
        class_token = torch.zeros(1, dtype=torch.long, device=self.device)
        return self._factor(tails, hidden, class_token, refs["image"], class_token)

    def _text_side(self, tokens: Tensor, refs: dict[str, Tensor], tails: tuple[Tail, Tail]) -> _Side:
        """``tokens``: one caption's ids SOT … EOT (cut after EOT)."""
        batch = tokens.to(self.device).unsqueeze(0)
        hidden = self.text.hidden(batch, self.text_layer).float()
        eot = self.text.pool_index(batch)
        return self._factor(tails, hidden, eot, refs["text"], refs["text_pool"].view(1))

    def _factor(
        self, tails: tuple[Tail, Tail], hidden: Tensor, pool: Tensor, ref_hidden: Tensor, ref_pool: Tensor
    ) -> _Side:
        """Integrated per-token derivatives of one input: hidden (1, S, W) → factor (E, S).

        Also gives, in float32 whatever the precision, the input's embedding, the reference's embedding
        and the start of the input's path: the reference's hidden states pooled at the input's row, so
        that the completeness figures differ between precisions only by the error of the sum.
        ``ref_hidden`` holds the reference's hidden states for at least S rows; ``pool`` and
        ``ref_pool`` are (1,).
        """
        tail, exact = tails
        _, s, w = hidden.shape
        dt = self.dtype
        delta = hidden[0] - ref_hidden[:s]
        alphas = self.points.to(device=self.device, dtype=torch.float32)
        n = len(alphas)
        points = (ref_hidden[:s] + alphas.view(n, 1, 1) * delta).to(dt)  # (N, S, W)
        deltas = delta.to(dt).expand(n, s, w)
        pools = pool.expand(n)
        max_tangents = self.max_tangents or tangent_budget(
            self.mlp_width, self.device, dt, self.memory_fraction
        )
        if len(tail.blocks) > 1 and tail.head.projection.shape[1] < s:
            # Fewer embedding axes than tokens: reverse mode needs fewer passes.
            chunk = max(1, max_tangents // (n * s))
            derivatives = dense_token_vjps(tail, points, deltas, pools, chunk)
        else:
            derivatives = token_jvps(tail, points, deltas, pools, max_tangents)
        factor = derivatives.float().mean(dim=0).T  # (E, S)
        embedding = embed(exact, hidden, pool)[0]
        ref_rows = max(s, int(ref_pool) + 1)
        ref_embedding = embed(exact, ref_hidden[:ref_rows].unsqueeze(0), ref_pool)[0]
        path_start = embed(exact, ref_hidden[:s].unsqueeze(0), pool)[0]
        return _Side(factor, embedding, ref_embedding, path_start)

    # ------------------------------------------------------------------------------- combine

    def _combine(self, text: _Side, image: _Side, grid: tuple[int, int]) -> PairResult:
        t_emb, x_emb = text.embedding, image.embedding
        logit_scale = cast(Tensor, self.model.logit_scale)  # an nn.Parameter of open_clip's CLIP
        scale = float(logit_scale.exp()) if self.scale_cos else 1.0
        norm = t_emb.norm() * x_emb.norm() / scale
        rows = text.factor.shape[1]
        a = text.factor.T @ image.factor / norm  # (tokens, image tokens)
        expected = float((t_emb - text.reference_embedding) @ (x_emb - image.reference_embedding) / norm)
        path_expected = float((t_emb - text.path_start) @ (x_emb - image.path_start) / norm)
        total = float(a.sum())
        return PairResult(
            interactions=a[:, 1:].reshape(rows, *grid).contiguous(),
            cls=a[:, 0].contiguous(),
            score=float(t_emb @ x_emb / (t_emb.norm() * x_emb.norm())),
            completeness=Completeness(
                total, expected, total - expected, path_expected, total - path_expected
            ),
        )


def _explicit_points(points: Sequence[float] | Tensor) -> Tensor:
    alphas = torch.as_tensor(points, dtype=torch.float64).flatten()
    if len(alphas) == 0 or not torch.isfinite(alphas).all():
        raise InvalidOption("points must be a non-empty sequence of finite interpolation points")
    return alphas


def _unique(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """Index of each key among the unique keys, and the first position of each unique key."""
    seen: dict[Hashable, int] = {}
    first: list[int] = []
    index: list[int] = []
    for pos, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(first)
            first.append(pos)
        index.append(seen[key])
    return index, first
