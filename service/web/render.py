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
    # Segment i holds t0 < t <= t1 (the first also t = -1), as the page's loop picks it.
    seg = np.clip(np.searchsorted(stops_t, t, side="left") - 1, 0, len(stops_t) - 2)
    t0, t1 = stops_t[seg], stops_t[seg + 1]
    frac = ((t - t0) / (t1 - t0))[..., None]
    c0, c1 = stops_rgb[seg], stops_rgb[seg + 1]
    return np.floor(c0 + (c1 - c0) * frac + 0.5).astype(np.uint8)


def _axis(n: int, start: float, end: float, cells: int) -> tuple[np.ndarray, ...]:
    """Per pixel along one axis: inside the crop box?, lower and upper cell index, fraction."""
    centre = np.arange(n) + 0.5
    inside = (centre >= start) & (centre < end)
    u = np.clip((centre - start) / ((end - start) / cells) - 0.5, 0, cells - 1)
    lo = np.floor(u).astype(int)
    return inside, lo, np.minimum(lo + 1, cells - 1), u - lo


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
    in_x, c0, c1, fu = _axis(width, x0, x1, cols)
    in_y, r0, r1, fv = _axis(height, y0, y1, rows)
    # Separable: along x on the small grid first, then along y at full size.
    across = grid[:, c0] * (1 - fu) + grid[:, c1] * fu  # (rows, width)
    values = across[r0] * (1 - fv)[:, None] + across[r1] * fv[:, None]
    inside = in_y[:, None] & in_x[None, :]
    values[~inside] = 0.0
    return values, inside


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
    pixels = np.array(image.convert("RGB"))
    height, width = pixels.shape[:2]
    limit = symmetric_limit(heatmap)
    values, inside = upsample(heatmap, crop_box, width, height)
    # Only the pixels inside the crop box change; work on that rectangle alone.
    ys, xs = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if ys.size and xs.size:
        window = np.s_[ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1]
        colours = colormap(values[window], limit).astype(np.float32)
        base = pixels[window].astype(np.float32)
        pixels[window] = np.floor(base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)
    out = Image.fromarray(pixels, "RGB")
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
