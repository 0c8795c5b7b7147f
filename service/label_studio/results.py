"""Result items of a Label Studio prediction, built from a job's ``Explanation``.

Image regions use percent of the original image (``x``, ``y``, ``width``, ``height`` in 0..100) and
carry ``original_width``/``original_height`` (the upright image, as the browser shows it); masks are
brush RLE of an H x W RGBA image. Text regions use character offsets counted in Unicode code points,
as Python indexes a ``str``: Label Studio 1.23's editor converts the browser's UTF-16 positions to
code points (``charsToCodePoints`` in its selection-tools.js) both ways, so an emoji counts one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from attribution.geometry import ImageGeometry
from attribution.text import Token
from service.label_studio.config import Control, LabelConfig
from service.label_studio.rle import block_rle


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _item(control: Control, kind: str, value: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": _region_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": kind,
        "origin": "prediction",
        "value": {**value, kind: [control.label]},
        **extra,
    }


@dataclass(frozen=True)
class GridMask:
    """A boolean H x W mask made of blocks: ``cells[i, j]`` fills ``heights[i]`` rows x ``widths[j]`` columns.

    A heatmap mask is constant on the model's patches, so it is kept as one cell per patch (and per
    band outside the crop): its box and brush RLE come from the cells, never from H x W pixels.
    """

    cells: np.ndarray
    heights: np.ndarray
    widths: np.ndarray

    def any(self) -> bool:
        return bool(self.cells.any())

    def box(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1: the pixels around the True ones (the mask is not empty)."""
        rows, cols = np.flatnonzero(self.cells.any(axis=1)), np.flatnonzero(self.cells.any(axis=0))
        x, y = np.cumsum([0, *self.widths]), np.cumsum([0, *self.heights])  # block edges
        return int(x[cols[0]]), int(y[rows[0]]), int(x[cols[-1] + 1]), int(y[rows[-1] + 1])

    def pixels(self) -> np.ndarray:
        """The H x W mask itself (for tests and small images)."""
        return np.repeat(np.repeat(self.cells, self.heights, axis=0), self.widths, axis=1)

    def rle(self) -> list[int]:
        return block_rle(self.cells, self.heights, self.widths)


def heatmap_mask(heatmap: Any, image: ImageGeometry, level: float) -> GridMask:
    """The mask of the original image's pixels whose patch scores ``level`` x the best or more.

    Each pixel takes the value of the patch its centre lies in (``image`` is the result's ``image``
    geometry: width, height, crop_box, patch_size); pixels outside the model's crop are False, and so is
    everything when no patch scores above zero.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    best = float(heat.max()) if heat.size else 0.0
    if np.isfinite(best) and best > 0:
        cells = heat >= level * best
    else:
        cells = np.zeros(heat.shape, dtype=bool)
    (x0, y0, _, _), (pw, ph) = image.crop_box, image.patch_size
    rows, heights = _bands(image.height, y0, ph, heat.shape[0])
    cols, widths = _bands(image.width, x0, pw, heat.shape[1])
    padded = np.pad(cells, ((0, 1), (0, 1)))  # index -1: a False row and column, for outside the crop
    return GridMask(padded[rows][:, cols], heights, widths)


def _bands(n: int, start: float, step: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels 0..n-1 of one axis in bands of the same patch: each band's patch (-1: outside), its size."""
    patch = np.floor((np.arange(n) + 0.5 - start) / step).astype(np.int64)
    patch[(patch < 0) | (patch >= count)] = -1
    starts = np.flatnonzero(np.diff(patch, prepend=-2) != 0)
    return patch[starts], np.diff(np.append(starts, n))


def _image_fields(image: ImageGeometry) -> dict[str, Any]:
    return {"original_width": image.width, "original_height": image.height, "image_rotation": 0}


def image_regions(
    config: LabelConfig, mask: GridMask, image: ImageGeometry, score: float | None = None
) -> list[dict[str, Any]]:
    """The brush mask and the rectangle around it (for the controls the config has); none if empty."""
    if not mask.any():
        return []
    width, height = image.width, image.height
    extra = {**_image_fields(image), **({"score": score} if score is not None else {})}
    out = []
    if config.brushes:
        out.append(_item(config.brushes, "brushlabels", {"format": "rle", "rle": mask.rle()}, **extra))
    if config.rectangles:
        x0, y0, x1, y1 = mask.box()
        box = {
            "x": 100 * x0 / width,
            "y": 100 * y0 / height,
            "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height,
            "rotation": 0,
        }
        out.append(_item(config.rectangles, "rectanglelabels", box, **extra))
    return out


def text_region(
    config: LabelConfig, caption: str, start: int, end: int, score: float | None = None
) -> dict[str, Any] | None:
    """A ``labels`` result on the Text for Python indices [start, end) of the caption (None: no <Labels>)."""
    if config.spans is None:
        return None
    value = {"start": start, "end": end, "text": caption[start:end]}
    return _item(config.spans, "labels", value, **({"score": score} if score is not None else {}))


def token_regions(
    config: LabelConfig, caption: str, tokens: list[Token], scores: list[float], min_score: float
) -> list[dict[str, Any]]:
    """Caption tokens by box score, strongest first: those scoring ``min_score`` x the best or more.

    Start and end tokens (empty spans) are left out; a region's ``score`` is its share of the best.
    """
    words = [(s, t) for s, t in zip(scores, tokens, strict=True) if t.end > t.start]
    best = max((s for s, _ in words), default=0.0)
    if best <= 0:
        return []
    kept = sorted(((s / best, t) for s, t in words if s >= min_score * best), key=lambda st: -st[0])
    regions = [text_region(config, caption, t.start, t.end, score=round(share, 4)) for share, t in kept]
    return [r for r in regions if r is not None]
