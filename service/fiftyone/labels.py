"""One explanation as FiftyOne labels: per phrase a signed heatmap on the image and its box.

A phrase's heatmap is the model's patch grid placed where the model looked (the ``crop_box`` of the
result's image geometry): the raw ``rows x cols`` grid when the crop is the whole image, else a map of
the image's aspect (longest side ``MAP_SIDE``) that is 0 outside the crop. Its ``range`` is symmetric,
``[-m, m]`` with ``m`` the largest magnitude, so 0 sits mid-scale and the sign reads off the colour.

The box (``BOX_METHOD``): around the patches scoring at least ``BOX_LEVEL`` x the best; its confidence is
the share of the positive heat that lies inside it. No positive patch: no box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribution.geometry import ImageGeometry
from attribution.pipeline import Explanation

MAP_SIDE = 128
BOX_LEVEL = 0.5
BOX_METHOD = (
    f"box around the patches scoring >= {BOX_LEVEL} x the best; "
    "confidence: share of the positive heat inside the box"
)


@dataclass(frozen=True)
class PhraseLabels:
    """One phrase's outputs: its heatmap (image frame), box and the scores of its tokens."""

    text: str
    start: int
    end: int
    heatmap: np.ndarray  # float32, the image's frame
    limit: float  # the heatmap's range is [-limit, limit]
    box: tuple[float, float, float, float] | None  # x, y, w, h relative to the image, FiftyOne's way
    box_share: float | None
    tokens: list[str]
    token_scores: list[float]


def patch_index(n_out: int, n_image: int, start: float, step: float, count: int) -> np.ndarray:
    """For each of ``n_out`` cells along an image side of ``n_image`` pixels: the patch its centre lies
    in, or -1 outside the model's crop."""
    centres = (np.arange(n_out) + 0.5) * (n_image / n_out)
    patch = np.floor((centres - start) / step).astype(np.int64)
    patch[(patch < 0) | (patch >= count)] = -1
    return patch


def image_map(grid: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """The patch grid in the image's frame (see the module docstring)."""
    x0, y0, x1, y1 = geometry.crop_box
    if (x0, y0, x1, y1) == (0, 0, geometry.width, geometry.height):
        return grid.astype(np.float32)
    scale = min(1.0, MAP_SIDE / max(geometry.width, geometry.height))
    out_w, out_h = max(1, round(geometry.width * scale)), max(1, round(geometry.height * scale))
    (pw, ph), (rows, cols) = geometry.patch_size, grid.shape
    row_of = patch_index(out_h, geometry.height, y0, ph, rows)
    col_of = patch_index(out_w, geometry.width, x0, pw, cols)
    padded = np.pad(grid.astype(np.float32), ((0, 1), (0, 1)))  # index -1: 0 outside the crop
    return padded[row_of][:, col_of]


def heat_box(
    grid: np.ndarray, geometry: ImageGeometry
) -> tuple[tuple[float, float, float, float] | None, float | None]:
    """The phrase's box (relative x, y, w, h, clipped to the image) and its share of positive heat."""
    positive = np.clip(grid, 0, None)
    total = float(positive.sum())
    if not np.isfinite(total) or total <= 0:
        return None, None
    rows, cols = np.nonzero(grid >= BOX_LEVEL * float(grid.max()))
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    share = float(positive[r0:r1, c0:c1].sum()) / total
    (cx0, cy0, _, _), (pw, ph) = geometry.crop_box, geometry.patch_size
    w, h = geometry.width, geometry.height
    left, right = np.clip([cx0 + c0 * pw, cx0 + c1 * pw], 0, w)
    top, bottom = np.clip([cy0 + r0 * ph, cy0 + r1 * ph], 0, h)
    if right <= left or bottom <= top:  # the patches lie in padding outside the image
        return None, None
    box = (float(left / w), float(top / h), float((right - left) / w), float((bottom - top) / h))
    return box, share


def token_totals(explanation: Explanation) -> np.ndarray:
    """Each token's interactions summed over the image patches: how much it adds to the score."""
    return explanation.result.interactions.sum(dim=(1, 2)).numpy().astype(np.float64)


def phrase_labels(explanation: Explanation) -> list[PhraseLabels]:
    """The labels of each span selection of the explanation, in order."""
    totals = token_totals(explanation)
    out = []
    for selected in explanation.selections:
        if selected.heatmap is None:  # a box selection; this integration sends spans only
            continue
        span = selected.selection
        start, end = int(getattr(span, "start", 0)), int(getattr(span, "end", 0))
        grid = selected.heatmap.numpy()
        limit = float(np.abs(grid).max()) if grid.size else 0.0
        box, share = heat_box(grid, explanation.geometry)
        indices = selected.tokens or []
        out.append(
            PhraseLabels(
                text=explanation.caption[start:end],
                start=start,
                end=end,
                heatmap=image_map(grid, explanation.geometry),
                limit=limit if np.isfinite(limit) and limit > 0 else 1.0,
                box=box,
                box_share=share,
                tokens=[explanation.tokens[i].text for i in indices],
                token_scores=[float(totals[i]) for i in indices],
            )
        )
    return out
