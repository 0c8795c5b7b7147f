"""Heatmap images: the colormap, the bilinear upsampling and the PNG overlay renderer.

The page (static/app.js) draws the same pictures in the browser; it loads the colormap from
``GET /static/colormap.json`` (built from ``COLORMAP_STOPS`` below), so there is one definition.

Colour rule (shared with the page):
    limit L = max |value| over the heatmap grid (1.0 when every value is 0: symmetric limits ±L),
    t = clamp(value / L, -1, 1), colour = linear interpolation in RGB between the two stops around t,
    each channel rounded with floor(x + 0.5).
Upsampling rule (shared with the page): the grid covers the crop box (the part of the original image
the model sees); a pixel whose centre (x + 0.5, y + 0.5) lies in the crop box gets the bilinear
interpolation of the patch values, patch centres at (col + 0.5, row + 0.5) patch sizes from the crop
box origin, clamped at the border patches (``align_corners=False``); pixels outside the crop box get
no overlay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Diverging blue-white-red ("coolwarm" end points): negative blue, zero white, positive red.
COLORMAP_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-1.0, (59, 76, 192)),
    (0.0, (247, 247, 247)),
    (1.0, (180, 4, 38)),
)

BoxCoords = tuple[float, float, float, float]


def colormap_json() -> dict:
    """The colormap definition as sent to the page."""
    return {
        "stops": [[t, list(rgb)] for t, rgb in COLORMAP_STOPS],
        "limit": "symmetric: L = max|value| (1 when all values are 0); t = clamp(value / L, -1, 1)",
        "rounding": "floor(x + 0.5) per channel",
    }


def symmetric_limit(values: np.ndarray) -> float:
    """``max |value|``, or 1.0 for an all-zero (or empty) array so that zeros map to white."""
    finite = np.abs(np.asarray(values, dtype=np.float64))
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def colormap(values: np.ndarray, limit: float) -> np.ndarray:
    """Map values to uint8 RGB (shape ``values.shape + (3,)``) with the shared diverging colormap."""
    t = np.clip(np.asarray(values, dtype=np.float64) / limit, -1.0, 1.0)
    stops_t = np.array([s[0] for s in COLORMAP_STOPS])
    stops_rgb = np.array([s[1] for s in COLORMAP_STOPS], dtype=np.float64)
    out = np.empty(t.shape + (3,), dtype=np.float64)
    for channel in range(3):
        out[..., channel] = np.interp(t, stops_t, stops_rgb[:, channel])
    return np.floor(out + 0.5).astype(np.uint8)


def upsample(
    grid: np.ndarray, crop_box: Sequence[float], width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinearly upsample a (rows, cols) grid placed over ``crop_box`` to a ``height x width`` image.

    Returns ``(values, inside)``: float64 values (0 outside the crop box) and a boolean mask of the
    pixels whose centre lies inside the crop box.
    """
    grid = np.asarray(grid, dtype=np.float64)
    rows, cols = grid.shape
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    px = (np.arange(width) + 0.5)
    py = (np.arange(height) + 0.5)
    inside_x = (px >= x0) & (px < x1)
    inside_y = (py >= y0) & (py < y1)
    u = np.clip((px - x0) / ((x1 - x0) / cols) - 0.5, 0, cols - 1)
    v = np.clip((py - y0) / ((y1 - y0) / rows) - 0.5, 0, rows - 1)
    c0 = np.floor(u).astype(int)
    r0 = np.floor(v).astype(int)
    c1 = np.minimum(c0 + 1, cols - 1)
    r1 = np.minimum(r0 + 1, rows - 1)
    fu = (u - c0)[None, :]
    fv = (v - r0)[:, None]
    top = grid[r0][:, c0] * (1 - fu) + grid[r0][:, c1] * fu
    bottom = grid[r1][:, c0] * (1 - fu) + grid[r1][:, c1] * fu
    values = top * (1 - fv) + bottom * fv
    inside = inside_y[:, None] & inside_x[None, :]
    return np.where(inside, values, 0.0), inside


def render_overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    alpha: float = 0.6,
    box: BoxCoords | None = None,
    legend: bool = False,
) -> Image.Image:
    """The heatmap over ``image`` (RGB, original size) blended with opacity ``alpha``.

    ``box`` draws that box's outline; ``legend`` appends a colour-scale band below the image (the
    only case in which the result is taller than the original image).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = base.shape[:2]
    limit = symmetric_limit(heatmap)
    values, inside = upsample(heatmap, crop_box, width, height)
    colours = colormap(values, limit).astype(np.float64)
    blend = np.where(inside[..., None], alpha, 0.0)
    out = Image.fromarray(np.floor(base * (1 - blend) + colours * blend + 0.5).astype(np.uint8), "RGB")
    if box is not None:
        _draw_box(out, box)
    if legend:
        out = _with_legend(out, limit)
    return out


def _draw_box(image: Image.Image, box: BoxCoords) -> None:
    """A black outline with a white inner line, visible on any background."""
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(image.size) / 150))
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0), width=line)
    draw.rectangle((x0 + line, y0 + line, x1 - 1 - line, y1 - 1 - line), outline=(255, 255, 255), width=line)


def _with_legend(image: Image.Image, limit: float) -> Image.Image:
    """Append a band with the colour bar from -limit to +limit and its value labels."""
    width, height = image.size
    band = max(36, width // 12)
    font = ImageFont.load_default(size=max(10, band // 3))
    out = Image.new("RGB", (width, height + band), (255, 255, 255))
    out.paste(image, (0, 0))
    margin = max(4, width // 40)
    bar_w = max(1, width - 2 * margin)
    bar_h = max(6, band // 3)
    ramp = colormap(np.linspace(-limit, limit, bar_w)[None, :].repeat(bar_h, axis=0), limit)
    out.paste(Image.fromarray(ramp, "RGB"), (margin, height + 4))
    draw = ImageDraw.Draw(out)
    label_y = height + 6 + bar_h
    for value, anchor, x in ((-limit, "la", margin), (0.0, "ma", width // 2), (limit, "ra", width - margin)):
        draw.text((x, label_y), f"{value:.3g}", fill=(0, 0, 0), font=font, anchor=anchor)
    return out
