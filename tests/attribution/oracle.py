"""An independent oracle of the method, the slow obvious way, sharing no code with ``attribution/``.

It runs the real open_clip / timm modules and nothing else: a forward pre-hook reads the hidden states
entering the chosen block (of the input and of the reference), another replaces them, so that the
embedding as a function of those rows is the model's own forward pass above the cut (pooling, final
norms, heads, masks and all). Its dense Jacobian (``torch.autograd.functional.jacobian``: one backward
pass per embedding axis) is taken at every interpolation point in float64, summed with the rule's
weights, and multiplied out as the reference does:

    A[s, p] = Σ_{i,j} Δt[s, i] · (J̄_tᵀ J̄_x)[(s, i), (p, j)] · Δx[p, j]  /  (‖h(t)‖ ‖g(x)‖)

over ALL rows of both towers: caption tokens, padding, class token, registers, patches.

Conventions (those the engine follows; see docs/method.md):
- image reference: the zero preprocessed image; every row is on the path ``r + α·(x − r)``;
- text reference: for a tower pooled on the highest id (CLIP) the authors' ``[SOT, 0, EOT, 0, …]``;
  for every other tower the tokenizer's output for ``""``, padded to the context length;
- the path is pooled as the *input* is (its own EOT / EOS row, or the last row), because the function
  differentiated is the model run on the input's token ids with the hidden states replaced.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TowerPath:
    """One tower's side of the oracle, float64. Rows are every row entering the cut block."""

    hidden: Tensor  # (S, W) the input's hidden states
    reference: Tensor  # (S, W) the reference's
    jacobian: Tensor  # (E, S, W) the integrated Jacobian of the embedding along the path
    embedding: Tensor  # (E,) the input's embedding
    reference_embedding: Tensor  # (E,) the reference's own embedding
    path_start: Tensor  # (E,) the input's embedding function at the reference's hidden states

    @property
    def delta(self) -> Tensor:
        return self.hidden - self.reference


@dataclass(frozen=True)
class OracleResult:
    """``matrix``: (text rows, image rows) on the cosine scale; ``expected`` and ``path_expected``:
    ``(h(t) − h(r_t))·(g(x) − g(r_x))`` and the value the matrix sums to as the rule converges (the
    path starts where the input's pooling puts the reference), both on the same scale."""

    matrix: Tensor
    text: TowerPath
    image: TowerPath
    expected: float
    path_expected: float

    @property
    def total(self) -> float:
        return float(self.matrix.sum())


def right_riemann(n: int) -> tuple[Tensor, Tensor]:
    """α = k/N for k = 1 … N, each weighted 1/N (the authors' sum: the input in, the reference out)."""
    points = torch.arange(1, n + 1, dtype=torch.float64) / n
    return points, torch.full((n,), 1.0 / n, dtype=torch.float64)


def gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1], from numpy (not the engine's own construction)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


# --- Where the blocks are ----------------------------------------------------------------------------


def text_blocks(model: nn.Module) -> Sequence[nn.Module]:
    """The text tower's transformer blocks (open_clip's CLIP, or CustomTextCLIP's ``text``)."""
    tower: Any = model.text if hasattr(model, "text") else model
    return tower.transformer.resblocks


def image_blocks(model: nn.Module) -> Sequence[nn.Module]:
    """The image tower's blocks: open_clip's ViT ``transformer.resblocks`` or a timm trunk's ``blocks``."""
    visual: Any = model.visual
    if hasattr(visual, "trunk"):
        return visual.trunk.blocks
    return visual.transformer.resblocks


def text_pool_type(model: nn.Module) -> str:
    tower: Any = model.text if hasattr(model, "text") else model
    return str(getattr(tower, "pool_type", None) or tower.text_pool_type)


def text_reference(model: nn.Module, tokenizer: Any) -> Tensor:
    """The text reference's ids (1, context): CLIP's ``[SOT, 0, EOT, 0, …]`` for a tower pooled on the
    highest id, else the tokenizer's own ``""``."""
    if text_pool_type(model) == "argmax":
        context = int(tokenizer("")[0].shape[0])
        ids = torch.zeros(1, context, dtype=torch.long)
        ids[0, 0], ids[0, 2] = tokenizer.sot_token_id, tokenizer.eot_token_id
        return ids
    return tokenizer([""]).long()


# --- Hooks --------------------------------------------------------------------------------------------


def _batch_first(x: Tensor) -> bool:
    return x.shape[0] == 1


def hidden_entering(block: nn.Module, run: Callable[[], Tensor]) -> Tensor:
    """The hidden states (S, W) entering ``block`` while ``run`` (a forward pass of one input) runs."""
    seen: list[Tensor] = []

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    handle = block.register_forward_pre_hook(capture)
    try:
        run()
    finally:
        handle.remove()
    (x,) = seen
    return x[0] if _batch_first(x) else x[:, 0]


def with_hidden(block: nn.Module, run: Callable[[], Tensor], hidden: Tensor) -> Tensor:
    """``run()``'s embedding (E,) with the hidden states entering ``block`` replaced by ``hidden`` (S, W)."""

    def replace(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        new = hidden.unsqueeze(0) if _batch_first(x) else hidden.unsqueeze(1)
        return (new.to(x.dtype), *args[1:])

    handle = block.register_forward_pre_hook(replace)
    try:
        return run()[0]
    finally:
        handle.remove()


# --- The method -----------------------------------------------------------------------------------------


class TowerOracle:
    """One tower for one input: its hidden states entering the cut block, its embeddings, and the dense
    Jacobian of its embedding function at any point of the path (each point's computed once)."""

    def __init__(
        self, block: nn.Module, run: Callable[[], Tensor], run_reference: Callable[[], Tensor]
    ) -> None:
        self.block, self.run = block, run
        self.hidden = hidden_entering(block, run)
        self.reference = hidden_entering(block, run_reference)
        with torch.no_grad():
            self.embedding = run()[0]
            self.reference_embedding = run_reference()[0]
            self.path_start = self.embedding_of(self.reference)
        self._jacobians: dict[float, Tensor] = {}

    def embedding_of(self, rows: Tensor) -> Tensor:
        """The input's embedding with the rows entering the cut block replaced by ``rows``."""
        return with_hidden(self.block, self.run, rows)

    def jacobian_at(self, alpha: float) -> Tensor:
        """(E, S, W): one backward pass per embedding axis at ``reference + α·(hidden − reference)``."""
        if alpha not in self._jacobians:
            point = self.reference + alpha * (self.hidden - self.reference)
            self._jacobians[alpha] = torch.autograd.functional.jacobian(self.embedding_of, point)
        return self._jacobians[alpha]

    def path(self, rule: tuple[Tensor, Tensor]) -> TowerPath:
        points, weights = rule
        jacobian = sum(
            w * self.jacobian_at(a) for a, w in zip(points.tolist(), weights.tolist(), strict=True)
        )
        assert isinstance(jacobian, Tensor)
        return TowerPath(
            self.hidden, self.reference, jacobian, self.embedding, self.reference_embedding, self.path_start
        )


class PairOracle:
    """The oracle for one pair: ``tokens`` (1, context) ids, ``image`` (1, 3, H, W) preprocessed,
    ``reference_tokens`` (1, context). The model is copied to float64; the original is untouched.
    ``result(rule)`` gives the matrix for a rule (points α, weights) on [0, 1], reusing the points
    earlier rules computed."""

    def __init__(
        self,
        model: nn.Module,
        tokens: Tensor,
        image: Tensor,
        text_layer: int,
        image_layer: int,
        reference_tokens: Tensor,
    ) -> None:
        model64: Any = copy.deepcopy(model).double().eval()
        image64 = image.double()
        self.text = TowerOracle(
            text_blocks(model64)[text_layer],
            lambda: model64.encode_text(tokens),
            lambda: model64.encode_text(reference_tokens),
        )
        self.image = TowerOracle(
            image_blocks(model64)[image_layer],
            lambda: model64.encode_image(image64),
            lambda: model64.encode_image(torch.zeros_like(image64)),
        )

    def result(self, rule: tuple[Tensor, Tensor]) -> OracleResult:
        text, img = self.text.path(rule), self.image.path(rule)
        e = text.jacobian.shape[0]
        s, wt = text.hidden.shape
        p, wx = img.hidden.shape
        product = (text.jacobian.reshape(e, s * wt).T @ img.jacobian.reshape(e, p * wx)).view(s, wt, p, wx)
        norm = float(text.embedding.norm() * img.embedding.norm())
        matrix = torch.einsum("si,sipj,pj->sp", text.delta, product, img.delta) / norm
        expected = (text.embedding - text.reference_embedding) @ (img.embedding - img.reference_embedding)
        path_expected = (text.embedding - text.path_start) @ (img.embedding - img.path_start)
        return OracleResult(matrix, text, img, float(expected) / norm, float(path_expected) / norm)


def explain(
    model: nn.Module,
    tokens: Tensor,
    image: Tensor,
    text_layer: int,
    image_layer: int,
    reference_tokens: Tensor,
    rule: tuple[Tensor, Tensor],
) -> OracleResult:
    """The oracle's matrix for one pair under one rule (see :class:`PairOracle`)."""
    return PairOracle(model, tokens, image, text_layer, image_layer, reference_tokens).result(rule)
