"""Grounding metrics of one heatmap on the model's patch grid against a phrase's boxes.

Heatmaps are (rows, cols) on the model's grid; ``ImageGeometry`` places each patch in the original image
(crop box and patch size in original pixels), where the boxes are. A phrase may have several boxes
(any of them counts): both metrics use their union.

- Pointing game: the heatmap's highest patch (the first one in row-major order on ties) is a hit
  when, by the ``centre`` rule, its centre lies in a box (x0 ≤ cx < x1, y0 ≤ cy < y1), or, by the
  ``overlap`` rule, it shares any area with a box. ``centre`` is the default; ``overlap`` is the more
  lenient rule for boxes smaller than a patch, which may contain no patch centre at all.
- Energy in box: the share of the positive heatmap mass inside the boxes, each patch's mass spread
  evenly over its area: Σ max(h, 0)·cover / Σ max(h, 0), where cover is the exact fraction of the patch
  inside the union of the boxes (clipped to the image). A heatmap without positive mass scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attribution.evaluation.grounding.samples import BoxCoords
from attribution.geometry import ImageGeometry

POINTING_RULES = ("centre", "overlap")


def union_cover(geometry: ImageGeometry, boxes: Sequence[BoxCoords]) -> torch.Tensor:
    """(rows, cols) float64: the fraction of each patch's area inside the union of ``boxes``.

    Exact: the plane is cut along every box and patch edge into cells that are wholly inside or
    outside the union, and each cell's area goes to the patch containing it.
    """
    rows, cols = geometry.grid
    pw, ph = geometry.patch_size
    kx0, ky0 = geometry.crop_box[:2]
    clipped = [
        (max(x0, 0.0), max(y0, 0.0), min(x1, float(geometry.width)), min(y1, float(geometry.height)))
        for x0, y0, x1, y1 in boxes
    ]
    clipped = [b for b in clipped if b[0] < b[2] and b[1] < b[3]]
    cover = torch.zeros(rows, cols, dtype=torch.float64)
    if not clipped:
        return cover
    x_edges = [kx0 + c * pw for c in range(cols + 1)]
    y_edges = [ky0 + r * ph for r in range(rows + 1)]
    xs = sorted({*x_edges, *(v for b in clipped for v in (b[0], b[2]))})
    ys = sorted({*y_edges, *(v for b in clipped for v in (b[1], b[3]))})
    xs = [x for x in xs if x_edges[0] <= x <= x_edges[-1]]
    ys = [y for y in ys if y_edges[0] <= y <= y_edges[-1]]
    for ya, yb in zip(ys[:-1], ys[1:], strict=True):
        cy = (ya + yb) / 2
        row = min(int((cy - ky0) // ph), rows - 1)
        for xa, xb in zip(xs[:-1], xs[1:], strict=True):
            cx = (xa + xb) / 2
            if any(b[0] <= cx < b[2] and b[1] <= cy < b[3] for b in clipped):
                col = min(int((cx - kx0) // pw), cols - 1)
                cover[row, col] += (xb - xa) * (yb - ya)
    return cover / (pw * ph)


def _check(heatmap: torch.Tensor, geometry: ImageGeometry) -> None:
    if tuple(heatmap.shape) != tuple(geometry.grid):
        raise ValueError(f"heatmap shape {tuple(heatmap.shape)} is not the model grid {geometry.grid}")


def argmax_patch(heatmap: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the highest value; the first in row-major order on ties."""
    flat = int(torch.argmax(heatmap.reshape(-1)))
    return divmod(flat, heatmap.shape[1])


def pointing_hit(
    heatmap: torch.Tensor, geometry: ImageGeometry, boxes: Sequence[BoxCoords], rule: str = "centre"
) -> bool:
    """Whether the heatmap's highest patch lies in one of ``boxes`` by ``rule`` (see module doc)."""
    _check(heatmap, geometry)
    if rule not in POINTING_RULES:
        raise ValueError(f"pointing rule must be one of {POINTING_RULES}, got {rule!r}")
    row, col = argmax_patch(heatmap)
    if rule == "overlap":
        return bool(union_cover(geometry, boxes)[row, col] > 0)
    x0, y0, x1, y1 = geometry.patch_box(row, col)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return any(b[0] <= cx < b[2] and b[1] <= cy < b[3] for b in boxes)


def energy_in_box(heatmap: torch.Tensor, geometry: ImageGeometry, boxes: Sequence[BoxCoords]) -> float:
    """Share of the positive heatmap mass inside the union of ``boxes`` (0 without positive mass)."""
    _check(heatmap, geometry)
    positive = heatmap.detach().double().clamp(min=0)
    total = float(positive.sum())
    if total <= 0:
        return 0.0
    return float((positive * union_cover(geometry, boxes)).sum()) / total
