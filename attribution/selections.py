"""Selections over an explanation: caption spans or token ranges -> image heatmap, image box -> token scores.

``interactions`` is a float tensor (tokens, rows, cols) whose token axis matches the caption's ``Token``
list (SOT .. EOT), e.g. ``PairResult.interactions``. Each selection has one string form, parsed by its
``parse`` classmethod (``parse_indexed`` adds the ``C:`` caption-index prefix), and each check lives
here once: ``selected_tokens`` for spans and token ranges, ``check_box`` for boxes.

- ``Span(start, end)``: characters [start, end) of the caption; selects every token whose character
  span overlaps it (SOT/EOT cover no characters, so a span never selects them).
- ``TokenRange(start, end)``: token indices [start, end), SOT is 0.
- ``Box(x0, y0, x1, y1)``: original-image pixels; each patch counts with the fraction of its area the
  box covers (``box_patch_weights``); a box must overlap the region the model sees (``check_box``).

Each also has one JSON form, ``to_dict``/``from_dict`` (``selection_from_dict`` for any of them), named
by its ``KIND``: ``{"kind": "span" | "tokens", "start", "end"}`` or ``{"kind": "box", "box": [x0, y0, x1,
y1]}``. The kind names are those of every public form: form fields, JSON bodies, query parameters and
results (``SELECTION_KINDS``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar

import torch

from attribution.errors import InvalidSelection
from attribution.geometry import ImageGeometry
from attribution.text import Token

# The string forms, one definition each (HTTP form fields, heatmap query parameters, CLI flags).
# Integers have at most MAX_DIGITS digits: far above any caption, token or caption count, and far below
# Python's int() limit on digits (4300, which raises ValueError rather than InvalidSelection).
MAX_DIGITS = 9
_INT = rf"\s*([+-]?\d{{1,{MAX_DIGITS}}})\s*"
_NUMBER = r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*"  # float(): no digit limit
_PAIR_RE = re.compile(f"{_INT}:{_INT}", re.ASCII)
_BOX_RE = re.compile(",".join([_NUMBER] * 4), re.ASCII)
_CAPTION_RE = re.compile(rf"\s*(\d{{1,{MAX_DIGITS}}})\s*", re.ASCII)
# Messages quote at most this many characters of the text they refuse (a form field may be 1 MB).
ECHO_CHARS = 40


def echo(text: str) -> str:
    """``repr`` of ``text`` for a message: at most ``ECHO_CHARS`` characters of it, then how many more."""
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def _check_index_pair(kind: str, start: Any, end: Any) -> None:
    for v in (start, end):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidSelection(f"{kind} start and end must be integers, got {start!r}:{end!r}")
    if start < 0 or start >= end:
        raise InvalidSelection(f"{kind} {start}:{end} is empty or negative: need 0 <= start < end")


def _parse_pair(kind: str, text: str, meaning: str) -> tuple[int, int]:
    match = _PAIR_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidSelection(
            f"{kind} {echo(text)} is malformed: use START:END with two integers ({meaning}, end "
            f"exclusive) of at most {MAX_DIGITS} digits each, e.g. 1:3"
        )
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of the original caption."""

    KIND: ClassVar[str] = "span"
    start: int
    end: int

    def __post_init__(self) -> None:
        _check_index_pair("span", self.start, self.end)

    @classmethod
    def parse(cls, text: str) -> Span:
        """``START:END`` (character offsets of the caption, end exclusive)."""
        return cls(*_parse_pair("span", text, "character offsets of the caption"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "start": self.start, "end": self.end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Span:
        """The inverse of ``to_dict``."""
        return cls(d["start"], d["end"])


@dataclass(frozen=True)
class TokenRange:
    """Token indices [start, end) (SOT is token 0)."""

    KIND: ClassVar[str] = "tokens"
    start: int
    end: int

    def __post_init__(self) -> None:
        _check_index_pair("token range", self.start, self.end)

    @classmethod
    def parse(cls, text: str) -> TokenRange:
        """``START:END`` (token indices, start token 0, end exclusive)."""
        return cls(*_parse_pair("token range", text, "token indices, the start token is 0"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "start": self.start, "end": self.end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenRange:
        """The inverse of ``to_dict``."""
        return cls(d["start"], d["end"])


@dataclass(frozen=True)
class Box:
    """A rectangle in original-image pixels (after EXIF rotation), x0 < x1, y0 < y1."""

    KIND: ClassVar[str] = "box"
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

    @classmethod
    def parse(cls, text: str) -> Box:
        """``x0,y0,x1,y1``: four decimal numbers in original-image pixels."""
        match = _BOX_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise InvalidSelection(
                f"box {echo(text)} is malformed: use x0,y0,x1,y1 with four numbers in original-image pixels, "
                "e.g. 10,20,110,80"
            )
        return cls(*(float(v) for v in match.groups()))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "box": [self.x0, self.y0, self.x1, self.y1]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Box:
        """The inverse of ``to_dict``."""
        return cls(*d["box"])


Selection = Span | TokenRange | Box
# Selection kinds by name: "kind" of a selection's JSON, and the name of its form field, JSON body key
# and heatmap query parameter.
SELECTION_KINDS: dict[str, type[Span] | type[TokenRange] | type[Box]] = {
    cls.KIND: cls for cls in (Span, TokenRange, Box)
}


def selection_from_dict(d: dict[str, Any]) -> Selection:
    """Any selection's ``to_dict()`` -> that selection; ``InvalidSelection`` for an unknown kind."""
    kind = d.get("kind")
    if kind not in SELECTION_KINDS:
        raise InvalidSelection(f"selection kind must be one of {', '.join(SELECTION_KINDS)}, got {kind!r}")
    return SELECTION_KINDS[kind].from_dict(d)


def parse_indexed(kind: str, text: str) -> tuple[int | None, Selection]:
    """``[C:]SELECTION`` -> (caption index C or None, selection), for forms with several captions.

    ``kind`` is ``span`` / ``tokens`` (``[C:]START:END``) or ``box`` (``[C:]x0,y0,x1,y1``).
    """
    if kind not in SELECTION_KINDS:
        raise ValueError(f"kind must be one of {tuple(SELECTION_KINDS)}, got {kind!r}")
    if not isinstance(text, str):
        raise InvalidSelection(f"{kind} must be a string, got {type(text).__name__}")
    cls = SELECTION_KINDS[kind]
    indexed = text.count(":") == (1 if cls is Box else 2)
    if not indexed:
        return None, cls.parse(text)
    head, rest = text.split(":", 1)
    match = _CAPTION_RE.fullmatch(head)
    if match is None:
        raise InvalidSelection(
            f"{kind} {echo(text)}: caption index {echo(head)} is not a non-negative integer of at most "
            f"{MAX_DIGITS} digits (the form is C:{'x0,y0,x1,y1' if cls is Box else 'START:END'}, "
            "C the caption index)"
        )
    return int(match[1]), cls.parse(rest)


def check_box(box: Box, geometry: ImageGeometry) -> tuple[float, float, float, float]:
    """The one validity rule for a box: it must overlap the part of the image the model sees.

    Returns the box clipped to the image. Raises ``InvalidSelection`` when the box lies outside the
    image, or inside it but outside ``geometry.crop_box`` (the region the model sees); only the image
    size and the model's transform are needed, so this runs before any compute.
    """
    if not isinstance(box, Box):
        raise InvalidSelection(f"expected a Box, got {type(box).__name__}")
    coords = [box.x0, box.y0, box.x1, box.y1]
    cx0, cy0 = max(box.x0, 0.0), max(box.y0, 0.0)
    cx1, cy1 = min(box.x1, float(geometry.width)), min(box.y1, float(geometry.height))
    if cx0 >= cx1 or cy0 >= cy1:
        raise InvalidSelection(
            f"box {coords} lies outside the {geometry.width}x{geometry.height} image; give original-image "
            f"pixels with 0 <= x <= {geometry.width}, 0 <= y <= {geometry.height}"
        )
    kx0, ky0, kx1, ky1 = geometry.crop_box
    if cx0 >= kx1 or cx1 <= kx0 or cy0 >= ky1 or cy1 <= ky0:
        crop = [round(v, 2) for v in geometry.crop_box]
        raise InvalidSelection(
            f"box {coords} does not overlap the part of the image the model sees "
            f"(crop_box {crop}); draw it inside that region"
        )
    return cx0, cy0, cx1, cy1


def box_patch_weights(box: Box, geometry: ImageGeometry) -> torch.Tensor:
    """Tensor (rows, cols): for each patch, the fraction of that patch's area the box covers.

    The box is clipped to the image (pixels outside it do not exist): a patch fully inside the clipped
    box weighs 1, a patch it half covers 0.5, a patch it misses 0. Bad boxes: see ``check_box``.
    """
    cx0, cy0, cx1, cy1 = check_box(box, geometry)
    kx0, ky0 = geometry.crop_box[:2]
    rows, cols = geometry.grid
    pw, ph = geometry.patch_size
    fx = _overlap(kx0 + torch.arange(cols + 1, dtype=torch.float64) * pw, cx0, cx1) / pw
    fy = _overlap(ky0 + torch.arange(rows + 1, dtype=torch.float64) * ph, cy0, cy1) / ph
    return torch.outer(fy, fx).to(torch.float32)


def _overlap(edges: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Length of [lo, hi] inside each interval [edges[i], edges[i + 1]]."""
    return (edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp(min=0)


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


def check_selection(selection: Selection, tokens: Sequence[Token], geometry: ImageGeometry) -> None:
    """Raise ``InvalidSelection`` unless ``selection`` fits the caption's tokens and the image geometry.

    Needs no model output, so a service can refuse bad selections before enqueueing a job.
    """
    if isinstance(selection, Box):
        check_box(selection, geometry)
    else:
        selected_tokens(tokens, selection)


def _check_interactions(interactions: torch.Tensor, n_tokens: int | None = None) -> None:
    if interactions.dim() != 3 or (n_tokens is not None and interactions.shape[0] != n_tokens):
        raise ValueError(
            f"interactions have shape {tuple(interactions.shape)}; "
            f"expected ({n_tokens or 'tokens'}, rows, cols)"
        )


def span_heatmap(
    interactions: torch.Tensor, tokens: Sequence[Token], selection: Span | TokenRange
) -> torch.Tensor:
    """Tensor (rows, cols): the sum of the interaction maps (tokens, rows, cols) of the selected tokens."""
    _check_interactions(interactions, len(tokens))
    return interactions[selected_tokens(tokens, selection)].sum(dim=0)


def box_token_scores(interactions: torch.Tensor, geometry: ImageGeometry, box: Box) -> torch.Tensor:
    """Tensor (tokens,): per token, the interactions summed over patches weighted by the box's cover."""
    _check_interactions(interactions)
    if tuple(interactions.shape[1:]) != tuple(geometry.grid):
        raise ValueError(
            f"interactions grid {tuple(interactions.shape[1:])} is not the image grid {geometry.grid}"
        )
    weights = box_patch_weights(box, geometry).to(device=interactions.device, dtype=interactions.dtype)
    return (interactions * weights).sum(dim=(1, 2))
