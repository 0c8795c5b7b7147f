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

import dataclasses
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from attribution.errors import InvalidOption
from attribution.memory import DEFAULT_MEMORY_FRACTION, tangent_budget, widest_mlp
from attribution.quadrature import (
    RIEMANN,
    TOLERANCE_MAX_POINTS,
    Rule,
    check_integration,
    nested_sizes,
    point_key,
    quadrature_rule,
    right_riemann_points,
)
from attribution.tail import Tail, dense_token_vjps, embed, pooled_token_vjps, token_jvps
from attribution.text import Tokenizer, clip_bpe_tokenizer, tokenize_caption
from attribution.tf32 import exact_float32
from attribution.tokenizers import HFTokenizer
from attribution.towers import PADDING_ROW, AnyImageTower, TextTower, image_tower, text_tower

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# What a caller who names no steps or precision gets: the library's, the service's and the evaluation's.
DEFAULT_STEPS = 10
DEFAULT_PRECISION = "float32"
# The text reference of a tower pooled on one row of a causal transformer (CLIP's EOT, MetaCLIP 2's EOS):
# "authors": the empty caption's ids as they are ([SOT, 0, EOT, …] for CLIP, as exclip builds it), so
# the input's path, pooled at the input's end row, does not end at the reference's own embedding;
# "aligned": the empty caption's end token moved onto the caption's end row, so the path ends at the
# reference's embedding and the interactions sum to the score change they explain. Non-causal towers
# read every row: their reference is the padded empty caption either way.
AUTHORS_REFERENCE = "authors"
ALIGNED_REFERENCE = "aligned"
TEXT_REFERENCES = (AUTHORS_REFERENCE, ALIGNED_REFERENCE)
DEFAULT_TEXT_REFERENCE = AUTHORS_REFERENCE

# A reverse pass (per cotangent) against a forward tangent pass through the same dense blocks.
REVERSE_PASS_COST = 1.0

# Per-model cache of the references' hidden states and embeddings; they depend only on the weights.
_REFERENCE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], dict[str, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Completeness:
    """How well the interactions add up, all on the cosine scale (divided by ‖h(t)‖·‖g(x)‖).

    ``total``: the sum of all interactions (extra rows and columns, e.g. CLS, included). ``expected``:
    ``(h(t)−h(r_t))·(g(x)−g(r_x))``, the value the method explains; ``gap = total − expected``.

    The reference's conventions pool every interpolation point at the *input's* EOT position but the
    text reference at its own (position 2), so the path integral ends at the reference's hidden state
    pooled at the input's EOT, not at ``h(r_t)``. ``path_expected`` is the value the sum converges to
    as the steps grow; ``integration_gap = total − path_expected`` is the Riemann-sum error alone and
    shrinks as N grows, while ``gap`` tends to ``path_expected − expected`` (zero for a one-token
    caption, whose EOT is at position 2 too). Causal EOS pooling behaves the same way; a non-causal
    text tower pools input and reference at the same row, so there ``path_expected == expected``.
    """

    total: float
    expected: float
    gap: float
    path_expected: float
    integration_gap: float


@dataclass(frozen=True)
class Integration:
    """How the integrated Jacobians were computed: the quadrature ``rule`` and the ``points`` per
    tower; with a ``tolerance``, the ``error_estimate`` (relative to the largest entry of the matrix:
    the larger of its last two changes between nested levels, which over-states the error of a
    converging rule) and ``converged`` (the estimate is below the tolerance; ``False`` when the maximum
    number of points came first). The last three are ``None`` without a tolerance."""

    rule: str
    points: int
    tolerance: float | None = None
    error_estimate: float | None = None
    converged: bool | None = None


@dataclass(frozen=True)
class PairResult:
    """The explanation of one (image, caption) pair, every entry float32 on the cosine scale.

    ``interactions``: (caption tokens, grid rows, grid cols): the caption's token rows as its
    tokenizer gave them (start token, if any, … end token) against the image patches.
    Rows and columns that are neither caption tokens nor patches are reported beside the matrix, one
    named vector each: ``extra_columns`` name → (caption tokens,) for image rows that are not
    patches (``"cls"``: the class token, ``"registers"``: the sum over register tokens), and
    ``extra_rows`` name → (grid rows, grid cols) for text rows that are not caption tokens
    (``"padding"``: the sum over the padding rows a non-causal text tower reads after the caption).
    ``corner``: the sum of the extra rows × extra columns entries, so that the matrix, the extra rows
    and columns and the corner add up to ``completeness.total``.
    ``cls``: ``extra_columns["cls"]``, or ``None`` for an image tower without a class token.
    ``score``: cosine similarity of the pair. ``integration``: the rule and points used (``None`` for
    results read back from older JSON).
    """

    interactions: Tensor
    cls: Tensor | None
    score: float
    completeness: Completeness
    integration: Integration | None = None
    extra_columns: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    extra_rows: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    corner: float = 0.0

    def entries(self) -> Tensor:
        """Every entry, flattened: the matrix, the extra columns, the extra rows and the corner."""
        parts = [self.interactions.flatten()]
        parts += [self.extra_columns[k].flatten() for k in sorted(self.extra_columns)]
        parts += [self.extra_rows[k].flatten() for k in sorted(self.extra_rows)]
        corner = torch.tensor([self.corner], dtype=self.interactions.dtype, device=self.interactions.device)
        return torch.cat([*parts, corner])


class _Side:
    """One tower's path for one input: its integrand (the per-token derivatives, (S, E) per point),
    computed for the points a rule asks for and kept, and the embeddings in float32."""

    def __init__(
        self,
        integrand: Callable[[Tensor, Tensor | None], Tensor],
        embedding: Tensor,
        reference_embedding: Tensor,
        path_start: Tensor,
        dense: bool,
        tokens: int,
        axes: int,
        caption_rows: int | None = None,
    ) -> None:
        # points α (float64, (N,)), cotangents (K, E) or None → derivatives (N, S, K or E)
        self.integrand = integrand
        self.dense = dense  # the tail has blocks on all rows (not only the pooled one)
        self.tokens, self.axes = tokens, axes  # S and E: the passes of forward and of reverse mode
        # Rows reported one by one (the caption's tokens); the rest (padding) are summed into one.
        self.caption_rows = tokens if caption_rows is None else caption_rows
        self.embedding = embedding  # (E,) of the input
        self.reference_embedding = reference_embedding  # (E,)
        self.path_start = path_start  # (E,) the reference's hidden states pooled as the input is
        # Each batch of points as computed, so that a rule asking for exactly one batch averages it
        # exactly as a single pass would (the reference's sum, bit for bit).
        self._batches: list[tuple[tuple[float, ...], Tensor]] = []
        self._rows: dict[float, Tensor] = {}

    def derivatives(self, rule: Rule) -> Tensor:
        """The integrand at the rule's points, in their order: (N, S, E), computing only new points."""
        keys = tuple(point_key(float(a)) for a in rule.points)
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        if missing:
            computed = self.integrand(rule.points[missing], None)
            self._batches.append((tuple(keys[i] for i in missing), computed))
            self._rows.update((keys[i], computed[j]) for j, i in enumerate(missing))
        batch = next((d for k, d in self._batches if k == keys), None)
        return batch if batch is not None else torch.stack([self._rows[k] for k in keys])

    def factor(self, rule: Rule) -> Tensor:
        """The integrated derivatives under ``rule``: (E, S) float32."""
        return _integrate(self.derivatives(rule), rule).T

    @property
    def reported_rows(self) -> int:
        """Rows of the reported factor: the caption rows, and one for all padding rows if any."""
        return self.caption_rows + int(self.tokens > self.caption_rows)

    def reported_factor(self, rule: Rule) -> Tensor:
        """The factor with the rows after the caption (padding) summed into one: (E, reported_rows)."""
        factor = self.factor(rule)
        if self.tokens == self.caption_rows:
            return factor
        n = self.caption_rows
        return torch.cat([factor[:, :n], factor[:, n:].sum(dim=1, keepdim=True)], dim=1)

    def contracted(self, other: Tensor, rule: Rule) -> Tensor:
        """``other.T @ factor(rule)`` for ``other`` (E, K), by one reverse pass per column of ``other``
        and point instead of the factor's passes: (K, S) float32. Not kept: it depends on ``other``."""
        return _integrate(self.integrand(rule.points, other.T), rule).T


def _integrate(derivatives: Tensor, rule: Rule) -> Tensor:
    """The rule's weighted sum over points of derivatives (N, S, K) → (S, K) float32; equal weights
    average exactly as the reference does."""
    derivatives = derivatives.float()
    if rule.weights is None:
        return derivatives.mean(dim=0)
    weights = rule.weights.to(device=derivatives.device, dtype=torch.float32)
    return torch.einsum("n,nsk->sk", weights, derivatives)


def interpolation_points(steps: int) -> Tensor:
    """The authors' right Riemann points (see :func:`attribution.quadrature.right_riemann_points`)."""
    return right_riemann_points(steps)


class Explainer:
    """Explains open_clip models by second-order caption–image interactions.

    ``model`` is an open_clip ``CLIP`` or ``CustomTextCLIP`` (eval mode) whose towers
    :mod:`attribution.towers` supports (ViTs of open_clip or timm; CLIP, SigLIP, SigLIP 2, CLIPA,
    MetaCLIP 2 text towers), ``tokenizer`` its open_clip tokenizer. ``text_layer``/``image_layer``
    choose the block whose input is attributed (``None``, the default: each tower's last block),
    ``steps`` the number N of interpolation points,
    ``precision`` the dtype of the derivative computation (``float32``, ``bfloat16`` or ``float16``).
    ``quadrature`` picks the rule (:data:`attribution.quadrature.RULES`; default the authors' right
    Riemann sum, or with a tolerance the default nested rule) and ``steps`` its points per tower.
    ``tolerance`` (relative to the largest entry of the matrix) replaces ``steps``: a nested rule is
    refined from 3 points, doubling, until the change from the previous level is below it or
    :data:`attribution.quadrature.TOLERANCE_MAX_POINTS` is reached; each result says which.
    ``contraction``: compute each image's interactions as its captions' text factors contracted
    through the image embedding by reverse mode (``True``), from the image's own factor (``False``),
    or by whichever needs fewer passes (``None``, the default: in float32 only, as the reduced-precision
    error bounds are those of the factor route; never with a tolerance, whose text factor changes from
    level to level).
    ``text_reference``: :data:`TEXT_REFERENCES` — ``"authors"`` (default: the reference's
    conventions) or ``"aligned"`` (the empty caption's end token on the caption's end row, so that
    ``completeness.total`` converges to ``expected``, not to ``path_expected``); it changes nothing for
    non-causal text towers.
    ``points``, if given, are explicit interpolation points α in place of :func:`interpolation_points`
    (as the reference's ``N`` accepts a tensor), e.g. to reproduce its N + 1 points exactly.

    Each distinct image and caption of a call is computed on its own, so a pair's result does not
    depend on what else is in the batch (bit for bit, on one device and thread count), with one
    exception: below the last block, whether an image is contracted through its embedding depends on
    all its captions' rows, and the two routes agree to rounding (about 1e-6), not bit for bit.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | HFTokenizer,
        text_layer: int | None = None,
        image_layer: int | None = None,
        steps: int = DEFAULT_STEPS,
        precision: str = DEFAULT_PRECISION,
        scale_cos: bool = False,
        max_tangents: int | None = None,
        *,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
        points: Sequence[float] | Tensor | None = None,
        quadrature: str | None = None,
        tolerance: float | None = None,
        contraction: bool | None = None,
        text_reference: str = DEFAULT_TEXT_REFERENCE,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text = text_tower(model)
        self.image = image_tower(model)
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
        if tolerance is not None and points is not None:
            raise InvalidOption("give either a tolerance or explicit points, not both")
        self.quadrature = check_integration(quadrature, steps, tolerance)
        if points is not None and self.quadrature != RIEMANN:
            raise InvalidOption("explicit points are averaged with equal weights: only with the riemann rule")
        self.tolerance = None if tolerance is None else float(tolerance)
        self.contraction = contraction  # None: choose per pair by the passes each way
        if text_reference not in TEXT_REFERENCES:
            raise InvalidOption(
                f"text_reference must be one of {', '.join(TEXT_REFERENCES)}, got {text_reference!r}"
            )
        self.text_reference = text_reference
        if points is not None:
            self.rule = Rule(_explicit_points(points), None)
        else:  # with a tolerance: the first level
            self.rule = quadrature_rule(self.quadrature, steps if tolerance is None else nested_sizes()[0])
        self.points = self.rule.points

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
        """Explain B pairs given token ids per caption as its tokenizer gives them (padding optional:
        a causal tower cuts it, a non-causal one is padded to its context with the padding id).

        Repeated images or captions are computed once: the image side is shared by all captions of an
        image and the text side by all images of a caption. Float32 is IEEE float32 throughout, TF32
        off (:mod:`attribution.tf32`); the caller's backend settings are restored afterwards.
        """
        pairs, grid = self._pairs(images, tokens)
        if self.tolerance is not None:
            return [self._refine(text, image, grid, self.tolerance) for text, image in pairs]
        integration = Integration(self.quadrature, len(self.rule))
        distinct = {(id(text), id(image)): (text, image) for text, image in pairs}  # repeats once
        rows: dict[int, int] = {}  # per image side: the text rows of all its captions
        for text, image in distinct.values():
            rows[id(image)] = rows.get(id(image), 0) + text.reported_rows
        done: dict[tuple[int, int], PairResult] = {}
        for key, (text, image) in distinct.items():
            contract = self.contraction
            if contract is None:  # reduced precision: the factor route, whose error bounds are tested
                exact = self.dtype == torch.float32
                contract = exact and contracts(image.dense, rows[id(image)], image.tokens, image.axes)
            done[key] = self._combine(text, image, grid, self.rule, integration, contract)
        return [done[id(text), id(image)] for text, image in pairs]

    @torch.no_grad()
    def explain_rules(
        self, images: Tensor, tokens: Sequence[Tensor], rules: Sequence[tuple[str, Rule]]
    ) -> list[list[PairResult]]:
        """The B pairs under each of several named rules (one list per rule), every point of every
        side computed once: rules that share points (nested ones, or a rule and its refinement) cost
        only the points they add. For comparing rules; a single rule is what ``explain_tokens`` does."""
        pairs, grid = self._pairs(images, tokens)
        return [
            [self._combine(text, image, grid, rule, Integration(name, len(rule))) for text, image in pairs]
            for name, rule in rules
        ]

    @torch.no_grad()
    def integrands(self, image: Tensor, tokens: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Each tower's integrand along its path for one pair: the per-token derivatives of the text
        embedding (N, S, E) and of the image embedding (N, 1 + patches, E) at the points α."""
        pairs, _ = self._pairs(image.unsqueeze(0), [tokens])
        text, image_side = pairs[0]
        rule = Rule(torch.as_tensor(points, dtype=torch.float64), None)
        return text.derivatives(rule), image_side.derivatives(rule)

    def _pairs(
        self, images: Tensor, tokens: Sequence[Tensor]
    ) -> tuple[list[tuple[_Side, _Side]], tuple[int, int]]:
        """The (text, image) sides of each pair, each distinct input's side made once, and the grid."""
        if images.dim() != 4 or images.shape[0] != len(tokens):
            raise InvalidOption(
                f"expected images (B, 3, H, W) and B captions, got {tuple(images.shape)} and {len(tokens)}"
            )
        image_of, unique_images = _unique([img.contiguous().cpu().numpy().tobytes() for img in images])
        # A causal mask: rows after the pooled one (padding) change nothing that is pooled, so cut them.
        tokens = [self._text_inputs(t) for t in tokens]
        text_of, unique_texts = _unique([tuple(t.tolist()) for t in tokens])
        refs = self._references((images.shape[-2], images.shape[-1]))
        image_tails = self._tails(self.image, self.image_layer)
        text_tails = self._tails(self.text, self.text_layer)
        image_sides = [self._image_side(images[i], refs, image_tails) for i in unique_images]
        text_sides = [self._text_side(tokens[i], refs, text_tails) for i in unique_texts]
        pairs = [(text_sides[t], image_sides[i]) for t, i in zip(text_of, image_of, strict=True)]
        return pairs, self.image.layout.grid

    def _text_inputs(self, tokens: Tensor) -> Tensor:
        """The ids entering the text path: cut after the pooled row (causal), or padded to the
        context as the tokenizer pads (non-causal)."""
        if self.text.causal:
            return self.text.cut(tokens)
        context = self.text.context_length
        if len(tokens) > context:
            raise InvalidOption(f"{len(tokens)} token ids exceed the text context of {context}")
        padding = tokens.new_full((context - len(tokens),), _special_ids(self.tokenizer)[1])
        return torch.cat([tokens, padding])

    def _caption_rows(self, tokens: Tensor) -> int:
        """How many of the ids are the caption's tokens (up to its end token); for a causal tower all
        rows kept are. Otherwise: up to the first end-of-sequence id, or (a tokenizer that appends
        none) the last id that is not padding."""
        if self.text.causal:
            return len(tokens)
        eos, pad = _special_ids(self.tokenizer)
        ends = (tokens == eos).nonzero() if eos is not None else tokens[:0]
        if len(ends):
            return int(ends[0]) + 1
        return int((tokens != pad).nonzero().max()) + 1 if bool((tokens != pad).any()) else len(tokens)

    def _refine(self, text: _Side, image: _Side, grid: tuple[int, int], tolerance: float) -> PairResult:
        """Double the nested rule's points until the matrix's last two changes between levels are
        below ``tolerance`` of its largest entry (one change can be small by accident: the bench
        showed it under-stating the error at 5 points), or the maximum is reached. Each side keeps its
        points, so a side shared by several pairs is computed once, level by level, whatever the other
        pairs need: a pair's result depends on its own inputs only."""
        previous: Tensor | None = None
        changes: list[float] = []
        result: PairResult | None = None
        for size in nested_sizes(stop=TOLERANCE_MAX_POINTS):
            rule = quadrature_rule(self.quadrature, size)
            result = self._combine(text, image, grid, rule, Integration(self.quadrature, size, tolerance))
            matrix = result.entries()
            if previous is not None:
                changes.append(float((matrix - previous).abs().max() / matrix.abs().max().clamp_min(1e-30)))
            previous = matrix
            if len(changes) >= 2:
                estimate = max(changes[-2:])
                integration = Integration(self.quadrature, size, tolerance, estimate, estimate <= tolerance)
                result = dataclasses.replace(result, integration=integration)
                if estimate <= tolerance:
                    break
        assert result is not None  # nested_sizes is never empty
        return result

    # ---------------------------------------------------------------------------------- sides

    def _references(self, image_shape: tuple[int, int]) -> dict[str, Tensor]:
        """Hidden states of the text and image references at the cut (cached per model)."""
        cache = _REFERENCE_CACHE.setdefault(self.model, {})
        key = (self.text_layer, self.image_layer, self.device, image_shape)
        if key not in cache:
            ref_tokens = self._reference_tokens()
            ref_image = torch.zeros(1, 3, *image_shape, device=self.device)
            cache[key] = {
                "text": self.text.hidden(ref_tokens, self.text_layer)[0].float(),
                "text_pool": self.text.pool_index(ref_tokens)[0],
                "image": self.image.hidden(ref_image, self.image_layer)[0].float(),
            }
        return cache[key]

    def _reference_tokens(self) -> Tensor:
        """The text reference: CLIP's (EOT pooling) is the authors' [SOT, 0, EOT, 0, …]; any other
        tower's is its tokenizer's output for the empty caption, padded as the tower sees inputs."""
        context = self.text.context_length
        if self.text.pool_type == "argmax":
            bpe = clip_bpe_tokenizer(self.tokenizer)  # argmax pooling finds EOT only with CLIP's ids
            ref_tokens = torch.zeros(1, context, dtype=torch.long, device=self.device)
            ref_tokens[0, 0] = bpe.sot_token_id
            ref_tokens[0, 2] = bpe.eot_token_id  # [SOT, 0, EOT, 0, …] as in the reference
            return ref_tokens
        tokenizer: Any = self.tokenizer
        empty: Tensor = tokenizer([""], context_length=context)
        return empty.to(device=self.device, dtype=torch.long).view(1, context)

    def _aligned_reference(self, length: int) -> tuple[Tensor, Tensor]:
        """The "aligned" text reference of a caption with ``length`` rows: the empty caption's start
        token(s), padding, and its end token on the caption's end row (``length - 1``); its hidden
        states at the cut (length, W) and its pooled row (1,). Cached per model, layer and length."""
        cache = _REFERENCE_CACHE.setdefault(self.model, {})
        key = (ALIGNED_REFERENCE, self.text_layer, self.device, length)
        if key not in cache:
            empty = self._reference_tokens()[0]
            pad = _special_ids(self.tokenizer)[1]
            ids = empty[empty != pad]  # the empty caption's own tokens: start token(s) if any, then end
            if length < len(ids):
                raise InvalidOption(f"a caption of {length} rows is shorter than the empty caption's")
            aligned = empty.new_full((1, length), pad)
            aligned[0, : len(ids) - 1] = ids[:-1]
            aligned[0, length - 1] = ids[-1]
            cache[key] = {
                "text": self.text.hidden(aligned, self.text_layer)[0].float(),
                "text_pool": self.text.pool_index(aligned)[0],
            }
        return cache[key]["text"], cache[key]["text_pool"].view(1)

    def _tails(self, tower: TextTower | AnyImageTower, layer: int) -> tuple[Tail, Tail]:
        """The tail in the derivative's precision, and in float32 for embeddings and completeness."""
        exact = tower.tail(layer, torch.float32, self.device)
        return (exact if self.dtype == torch.float32 else tower.tail(layer, self.dtype, self.device)), exact

    def _image_side(self, image: Tensor, refs: dict[str, Tensor], tails: tuple[Tail, Tail]) -> _Side:
        hidden = self.image.hidden(image.unsqueeze(0).to(self.device), self.image_layer).float()
        # The pooled row (the class token) of a tower pooled on one row; unread by any other pooling.
        pooled = torch.full((1,), self.image.layout.pool_row or 0, dtype=torch.long, device=self.device)
        return self._factor(tails, hidden, pooled, refs["image"], pooled)

    def _text_side(self, tokens: Tensor, refs: dict[str, Tensor], tails: tuple[Tail, Tail]) -> _Side:
        """``tokens``: one caption's ids as they enter the path (see :meth:`_text_inputs`)."""
        batch = tokens.to(self.device).unsqueeze(0)
        hidden = self.text.hidden(batch, self.text_layer).float()
        pooled = self.text.pool_index(batch)
        ref_hidden, ref_pool = refs["text"], refs["text_pool"].view(1)
        if self.text_reference == ALIGNED_REFERENCE and self.text.causal:
            ref_hidden, ref_pool = self._aligned_reference(len(tokens))
        side = self._factor(tails, hidden, pooled, ref_hidden, ref_pool)
        side.caption_rows = self._caption_rows(tokens)
        return side

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
        s = hidden.shape[1]
        delta = hidden[0] - ref_hidden[:s]

        def integrand(alphas: Tensor, cotangents: Tensor | None) -> Tensor:
            return self._derivatives(tail, ref_hidden[:s], delta, pool, alphas, cotangents)

        embedding = embed(exact, hidden, pool)[0]
        ref_rows = max(s, int(ref_pool) + 1)
        ref_embedding = embed(exact, ref_hidden[:ref_rows].unsqueeze(0), ref_pool)[0]
        path_start = embed(exact, ref_hidden[:s].unsqueeze(0), pool)[0]
        axes = tail.head.projection.shape[1]
        return _Side(integrand, embedding, ref_embedding, path_start, tail.dense, s, axes)

    def _derivatives(
        self,
        tail: Tail,
        start: Tensor,
        delta: Tensor,
        pool: Tensor,
        alphas: Tensor,
        cotangents: Tensor | None,
    ) -> Tensor:
        """Per-token derivatives of the embedding at the points ``start + α·delta``: (N, S, E); with
        ``cotangents`` (K, E), contracted with them by reverse mode: (N, S, K)."""
        s, w = delta.shape
        dt = self.dtype
        alphas = alphas.to(device=self.device, dtype=torch.float32)
        n = len(alphas)
        points = (start + alphas.view(n, 1, 1) * delta).to(dt)  # (N, S, W)
        deltas = delta.to(dt).expand(n, s, w)
        pools = pool.expand(n)
        max_tangents = self.max_tangents or tangent_budget(
            self.mlp_width, self.device, dt, self.memory_fraction
        )
        if cotangents is not None:
            # The reverse pass keeps every block's activations: bound the rows × blocks it holds.
            per_pass = max(1, max_tangents // (s * len(tail.blocks)))
            parts = []
            for p0 in range(0, n, per_pass):
                m = min(per_pass, n - p0)
                chunk = max(1, max_tangents // (m * s))
                window = slice(p0, p0 + m)
                parts.append(
                    pooled_token_vjps(tail, points[window], deltas[window], chunk, cotangents)
                    if tail.pooling is not None
                    else dense_token_vjps(
                        tail, points[window], deltas[window], pools[window], chunk, cotangents
                    )
                )
            return torch.cat(parts)
        if tail.dense and tail.head.projection.shape[1] < s:
            # Fewer embedding axes than tokens: reverse mode needs fewer passes.
            chunk = max(1, max_tangents // (n * s))
            if tail.pooling is not None:
                return pooled_token_vjps(tail, points, deltas, chunk)
            return dense_token_vjps(tail, points, deltas, pools, chunk)
        return token_jvps(tail, points, deltas, pools, max_tangents)

    # ------------------------------------------------------------------------------- combine

    def _combine(
        self,
        text: _Side,
        image: _Side,
        grid: tuple[int, int],
        rule: Rule,
        integration: Integration,
        contract: bool = False,
    ) -> PairResult:
        t_emb, x_emb = text.embedding, image.embedding
        logit_scale = cast(Tensor, self.model.logit_scale)  # an nn.Parameter of open_clip's models
        scale = float(logit_scale.exp()) if self.scale_cos else 1.0
        norm = t_emb.norm() * x_emb.norm() / scale
        text_factor = text.reported_factor(rule)
        if contract:  # A = Tᵀ I with I never formed: one reverse pass per text row and point
            a = image.contracted(text_factor, rule) / norm
        else:
            a = text_factor.T @ image.factor(rule) / norm  # (text rows, image rows)
        expected = float((t_emb - text.reference_embedding) @ (x_emb - image.reference_embedding) / norm)
        path_expected = float((t_emb - text.path_start) @ (x_emb - image.path_start) / norm)
        total = float(a.sum())
        layout, n = self.image.layout, text.caption_rows
        patches = a[:, layout.patch_start :]
        extra_columns = {name: a[:n, rows].sum(dim=1) for name, rows in layout.extras.items()}
        padded = a.shape[0] > n
        return PairResult(
            interactions=patches[:n].reshape(n, *grid).contiguous(),
            cls=a[:n, layout.extras["cls"].start].contiguous() if "cls" in layout.extras else None,
            score=float(t_emb @ x_emb / (t_emb.norm() * x_emb.norm())),
            completeness=Completeness(
                total, expected, total - expected, path_expected, total - path_expected
            ),
            integration=integration,
            extra_columns=extra_columns,
            extra_rows={PADDING_ROW: patches[n].reshape(grid).contiguous()} if padded else {},
            corner=float(a[n, : layout.patch_start].sum()) if padded else 0.0,
        )


def contracts(dense: bool, text_rows: int, image_tokens: int, axes: int) -> bool:
    """Whether an image's interactions are cheaper as its captions' text factors contracted through
    the image embedding (one reverse pass per text row of all its captions, ``text_rows``) than from
    the image's own factor (one forward tangent per image token, or one reverse pass per embedding
    axis), a reverse pass weighing ``REVERSE_PASS_COST`` forward ones. Never at the last block, where a
    forward tangent costs one row, not a pass."""
    return dense and REVERSE_PASS_COST * text_rows < min(image_tokens, axes)


def _special_ids(tokenizer: object) -> tuple[int | None, int]:
    """The end-of-sequence id (``None`` if the tokenizer has none) and the padding id."""
    hf: Any = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "pad_token_id"):  # open_clip's HFTokenizer
        pad = hf.pad_token_id
        return hf.eos_token_id, 0 if pad is None else int(pad)
    bpe: Any = tokenizer
    return int(bpe.eot_token_id), 0  # CLIP's BPE pads with 0


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
