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


def tower_path(
    block: nn.Module,
    run: Callable[[], Tensor],
    run_reference: Callable[[], Tensor],
    rule: tuple[Tensor, Tensor],
) -> TowerPath:
    """One tower's hidden states, integrated Jacobian and embeddings: ``run`` encodes the input,
    ``run_reference`` the reference; the path is the input's forward pass on interpolated rows."""
    hidden = hidden_entering(block, run)
    reference = hidden_entering(block, run_reference)

    def embedding_of(rows: Tensor) -> Tensor:
        return with_hidden(block, run, rows)

    points, weights = rule
    jacobian = torch.zeros(0)
    for alpha, weight in zip(points.tolist(), weights.tolist(), strict=True):
        point = reference + alpha * (hidden - reference)
        j = torch.autograd.functional.jacobian(embedding_of, point)  # (E, S, W)
        jacobian = weight * j if jacobian.numel() == 0 else jacobian + weight * j
    with torch.no_grad():
        embedding = run()[0]
        return TowerPath(
            hidden=hidden,
            reference=reference,
            jacobian=jacobian,
            embedding=embedding,
            reference_embedding=run_reference()[0],
            path_start=embedding_of(reference),
        )


def explain(
    model: nn.Module,
    tokens: Tensor,
    image: Tensor,
    text_layer: int,
    image_layer: int,
    reference_tokens: Tensor,
    rule: tuple[Tensor, Tensor],
) -> OracleResult:
    """The oracle's matrix for one pair: ``tokens`` (1, context) ids, ``image`` (1, 3, H, W) preprocessed,
    ``rule`` (points α, weights) on [0, 1]. The model is copied to float64; the original is untouched."""
    model64 = copy.deepcopy(model).double().eval()
    image64 = image.double()

    def encode_text(ids: Tensor) -> Callable[[], Tensor]:
        return lambda: model64.encode_text(ids)  # type: ignore[operator]

    def encode_image(pixels: Tensor) -> Callable[[], Tensor]:
        return lambda: model64.encode_image(pixels)  # type: ignore[operator]

    text = tower_path(
        text_blocks(model64)[text_layer], encode_text(tokens), encode_text(reference_tokens), rule
    )
    img = tower_path(
        image_blocks(model64)[image_layer],
        encode_image(image64),
        encode_image(torch.zeros_like(image64)),
        rule,
    )
    e = text.jacobian.shape[0]
    s, wt = text.hidden.shape
    p, wx = img.hidden.shape
    product = (text.jacobian.reshape(e, s * wt).T @ img.jacobian.reshape(e, p * wx)).view(s, wt, p, wx)
    norm = float(text.embedding.norm() * img.embedding.norm())
    matrix = torch.einsum("si,sipj,pj->sp", text.delta, product, img.delta) / norm
    expected = float((text.embedding - text.reference_embedding) @ (img.embedding - img.reference_embedding))
    path_expected = float((text.embedding - text.path_start) @ (img.embedding - img.path_start))
    return OracleResult(matrix, text, img, expected / norm, path_expected / norm)
