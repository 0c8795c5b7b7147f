"""Selections over an explanation: caption spans or token ranges -> image heatmap, image box -> token scores.

``result`` is anything with ``.interactions``, a float tensor (tokens, rows, cols) whose token axis
matches the caption's ``Token`` list (SOT .. EOT), e.g. a ``PairResult``.

- ``Span(start, end)``: characters [start, end) of the caption; selects every token whose character
  span overlaps it (SOT/EOT cover no characters, so a span never selects them).
- ``TokenRange(start, end)``: token indices [start, end), SOT is 0.
- ``Box(x0, y0, x1, y1)``: original-image pixels; each patch counts with the fraction of its area the
  box covers (see ``ImageGeometry.box_to_patch_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from attribution.errors import InvalidSelection
from attribution.images import ImageGeometry
from attribution.text import Token


def _check_index_pair(kind: str, start: Any, end: Any) -> None:
    for v in (start, end):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidSelection(f"{kind} start and end must be integers, got {start!r}:{end!r}")
    if start < 0 or start >= end:
        raise InvalidSelection(f"{kind} {start}:{end} is empty or negative: need 0 <= start < end")


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of the original caption."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _check_index_pair("span", self.start, self.end)


@dataclass(frozen=True)
class TokenRange:
    """Token indices [start, end) (SOT is token 0)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _check_index_pair("token range", self.start, self.end)


@dataclass(frozen=True)
class Box:
    """A rectangle in original-image pixels (after EXIF rotation), x0 < x1, y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
            raise InvalidSelection(f"box coordinates must be finite numbers, got {list(coords)}")
        if self.x0 >= self.x1 or self.y0 >= self.y1:
            raise InvalidSelection(f"box {list(coords)} is empty: need x0 < x1 and y0 < y1 (original pixels)")


def selected_tokens(tokens: Sequence[Token], selection: Span | TokenRange) -> list[int]:
    """Indices of the tokens a span or token range selects; ``InvalidSelection`` if it does not fit."""
    if isinstance(selection, TokenRange):
        if selection.end > len(tokens):
            raise InvalidSelection(
                f"token range {selection.start}:{selection.end} is out of range: the caption has "
                f"{len(tokens)} tokens (0..{len(tokens) - 1}, start and end tokens included)"
            )
        return list(range(selection.start, selection.end))
    if isinstance(selection, Span):
        length = tokens[-1].end if tokens else 0  # EOT sits at (len, len)
        if selection.end > length:
            raise InvalidSelection(
                f"span {selection.start}:{selection.end} is out of range: the caption has {length} characters"
            )
        picked = [t.index for t in tokens if t.start < selection.end and selection.start < t.end]
        if not picked:
            raise InvalidSelection(
                f"span {selection.start}:{selection.end} covers no token (only spaces, or text cut off by "
                "truncation); select characters of a word"
            )
        return picked
    raise InvalidSelection(f"expected a Span or TokenRange, got {type(selection).__name__}")


def _interactions(result: Any, n_tokens: int | None = None) -> torch.Tensor:
    inter = result.interactions
    if inter.dim() != 3 or (n_tokens is not None and inter.shape[0] != n_tokens):
        raise ValueError(
            f"interactions have shape {tuple(inter.shape)}; expected ({n_tokens or 'tokens'}, rows, cols)"
        )
    return inter


def span_heatmap(result: Any, tokens: Sequence[Token], selection: Span | TokenRange) -> torch.Tensor:
    """Tensor (rows, cols): the sum of the interaction maps of the selected tokens."""
    inter = _interactions(result, len(tokens))
    return inter[selected_tokens(tokens, selection)].sum(dim=0)


def box_token_scores(result: Any, geometry: ImageGeometry, box: Box) -> torch.Tensor:
    """Tensor (tokens,): per token, the interactions summed over patches weighted by the box's cover."""
    inter = _interactions(result)
    if tuple(inter.shape[1:]) != tuple(geometry.grid):
        raise ValueError(f"interactions grid {tuple(inter.shape[1:])} is not the image grid {geometry.grid}")
    weights = geometry.box_to_patch_weights(box).to(device=inter.device, dtype=inter.dtype)
    return (inter * weights).sum(dim=(1, 2))
