"""Result items of a Label Studio prediction, built from a job's CaptionResult.

Image regions use percent of the original image (``x``, ``y``, ``width``, ``height`` in 0..100) and
carry ``original_width``/``original_height`` (the upright image, as the browser shows it); masks are
brush RLE of an H x W RGBA image. Text regions use character offsets counted in Unicode code points,
as Python indexes a ``str``: Label Studio 1.23's editor converts the browser's UTF-16 positions to
code points (``charsToCodePoints`` in its selection-tools.js) both ways, so an emoji counts one.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from service.label_studio.config import Control, LabelConfig
from service.label_studio.rle import mask_rle


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


def heatmap_mask(heatmap: np.ndarray, image: dict[str, Any], level: float) -> np.ndarray:
    """Boolean H x W mask of the original image: pixels whose patch scores ``level`` x the best or more.

    Each pixel takes the value of the patch its centre lies in (``image`` is the result's ``image``
    object: width, height, crop_box, patch_size); pixels outside the model's crop are False, and so is
    everything when no patch scores above zero.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    width, height = image["width"], image["height"]
    best = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(best) or best <= 0:
        return np.zeros((height, width), dtype=bool)
    cells = heat >= level * best
    rows, cols = heat.shape
    (x0, y0, _, _), (pw, ph) = image["crop_box"], image["patch_size"]
    col = np.floor((np.arange(width) + 0.5 - x0) / pw).astype(np.int64)
    row = np.floor((np.arange(height) + 0.5 - y0) / ph).astype(np.int64)
    col_ok, row_ok = (col >= 0) & (col < cols), (row >= 0) & (row < rows)
    picked = cells[np.clip(row, 0, rows - 1)[:, None], np.clip(col, 0, cols - 1)[None, :]]
    return picked & row_ok[:, None] & col_ok[None, :]


def _image_fields(image: dict[str, Any]) -> dict[str, Any]:
    return {"original_width": image["width"], "original_height": image["height"], "image_rotation": 0}


def image_regions(
    config: LabelConfig, mask: np.ndarray, image: dict[str, Any], score: float | None = None
) -> list[dict[str, Any]]:
    """The brush mask and the rectangle around it (for the controls the config has); none if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    width, height = image["width"], image["height"]
    extra = {**_image_fields(image), **({"score": score} if score is not None else {})}
    out = []
    if config.brushes:
        out.append(_item(config.brushes, "brushlabels", {"format": "rle", "rle": mask_rle(mask)}, **extra))
    if config.rectangles:
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
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
    config: LabelConfig, caption: str, tokens: list[dict[str, Any]], scores: list[float], min_score: float
) -> list[dict[str, Any]]:
    """Caption tokens by box score, strongest first: those scoring ``min_score`` x the best or more.

    Start and end tokens (empty spans) are left out; a region's ``score`` is its share of the best.
    """
    words = [(s, t) for s, t in zip(scores, tokens, strict=True) if t["end"] > t["start"]]
    best = max((s for s, _ in words), default=0.0)
    if best <= 0:
        return []
    kept = sorted(((s / best, t) for s, t in words if s >= min_score * best), key=lambda st: -st[0])
    regions = [text_region(config, caption, t["start"], t["end"], score=round(share, 4)) for share, t in kept]
    return [r for r in regions if r is not None]
