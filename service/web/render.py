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

Memory: a PNG is at most ``MAX_SIDE`` px a side, and ``render_png`` takes the upload there without a
full-size copy of it (``attribution.decode.decode_scaled``: a JPEG is decoded at a reduced scale, any
mode but RGB and greyscale converted a band of rows at a time, EXIF orientation applied to the small
result). So a render holds the decoded upload plus a few MB, whatever its mode.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from attribution.decode import decode_scaled, fit_size, scaled_rgb_or_grey

# Diverging blue-white-red ("coolwarm" end points): negative blue, zero white, positive red.
COLORMAP_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-1.0, (59, 76, 192)),
    (0.0, (247, 247, 247)),
    (1.0, (180, 4, 38)),
)

BoxCoords = tuple[float, float, float, float]
MAX_SIDE = 2048  # default and largest long side of a rendered PNG: memory is bounded by this, not the upload
LEGEND_MAX_HEIGHT = 96
ROWS_PER_BLOCK = 256  # rows blended at a time: float temporaries stay at a few MB whatever the width


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
    t = np.clip(np.asarray(values, dtype=np.float32) / np.float32(limit), -1.0, 1.0)
    out = np.zeros(t.shape + (3,), dtype=np.uint8)
    # Segment i holds t0 < t <= t1 (the first also t = -1), as the page's loop picks it.
    for i, ((t0, c0), (t1, c1)) in enumerate(zip(COLORMAP_STOPS, COLORMAP_STOPS[1:], strict=False)):
        segment = (t <= t1) if i == 0 else (t > t0) & (t <= t1)
        frac = (t[segment] - np.float32(t0)) / np.float32(t1 - t0)
        for channel in range(3):
            start, end = np.float32(c0[channel]), np.float32(c1[channel])
            out[..., channel][segment] = np.floor(start + (end - start) * frac + np.float32(0.5))
    return out


def _axis(n: int, start: float, end: float, cells: int) -> tuple[np.ndarray, ...]:
    """Per pixel along one axis: inside the crop box?, lower and upper cell index, fraction."""
    centre = np.arange(n, dtype=np.float64) + 0.5
    inside = (centre >= start) & (centre < end)
    u = np.clip((centre - start) / ((end - start) / cells) - 0.5, 0, cells - 1)
    lo = np.floor(u).astype(np.intp)
    return inside, lo, np.minimum(lo + 1, cells - 1), (u - lo).astype(np.float32)


def _row_blocks(
    grid: np.ndarray, crop_box: Sequence[float], width: int, height: int, rows_per_block: int = ROWS_PER_BLOCK
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """``upsample`` by blocks of rows: (rows, float32 values, inside mask), so memory stays small."""
    grid = np.asarray(grid, dtype=np.float32)
    rows, cols = grid.shape
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    in_x, c0, c1, fu = _axis(width, x0, x1, cols)
    in_y, r0, r1, fv = _axis(height, y0, y1, rows)
    # Separable: along x on the small grid first, then along y one block of rows at a time.
    across = grid[:, c0] * (1 - fu) + grid[:, c1] * fu  # (grid rows, width)
    for top in range(0, height, rows_per_block):
        block = slice(top, min(height, top + rows_per_block))
        v = fv[block, None]
        values = across[r0[block]] * (1 - v) + across[r1[block]] * v
        inside = in_y[block, None] & in_x[None, :]
        values[~inside] = 0.0
        yield block, values, inside


def upsample(
    grid: np.ndarray, crop_box: Sequence[float], width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinearly upsample a (rows, cols) grid placed over ``crop_box`` to a ``height x width`` image.

    Returns ``(values, inside)``: float32 values (0 outside the crop box) and a boolean mask of the
    pixels whose centre lies inside the crop box.
    """
    blocks = list(_row_blocks(grid, crop_box, width, height))
    return np.concatenate([b[1] for b in blocks]), np.concatenate([b[2] for b in blocks])


def render_overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    alpha: float = 0.6,
    box: BoxCoords | None = None,
    legend: bool = False,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """The heatmap over ``image`` (RGB) blended with opacity ``alpha``, at most ``max_side`` px a side.

    An image larger than ``max_side`` is scaled down first (``crop_box`` and ``box`` with it), so the
    memory used is bounded by ``max_side``, not by the upload. ``box`` draws that box's outline;
    ``legend`` appends a colour-scale band below the image (the only case in which the result is
    taller than the image).
    """
    scaled = scaled_rgb_or_grey(image, fit_size(*image.size, max_side))
    return _overlay(scaled, image.size, heatmap, crop_box, alpha=alpha, box=box, legend=legend)


def render_png(
    data: bytes,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    alpha: float = 0.6,
    box: BoxCoords | None = None,
    legend: bool = False,
    max_side: int = MAX_SIDE,
    max_pixels: int = 64_000_000,
) -> bytes:
    """``render_overlay`` of encoded image bytes, as PNG bytes, without a full-size copy of the image
    (``attribution.decode.decode_scaled``); ``crop_box`` and ``box`` are in pixels of the upright
    original."""
    image, size = decode_scaled(data, max_side, max_pixels=max_pixels)
    out = io.BytesIO()
    _overlay(image, size, heatmap, crop_box, alpha=alpha, box=box, legend=legend).save(out, format="PNG")
    return out.getvalue()


def _overlay(
    image: Image.Image,
    source_size: tuple[int, int],
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    alpha: float,
    box: BoxCoords | None,
    legend: bool,
) -> Image.Image:
    """Blend the heatmap over ``image`` (RGB or ``L``, already at the output size); ``crop_box`` and
    ``box`` are in pixels of the ``source_size`` image it was scaled from. The legend band is part of
    the one pixel array from the start, so the picture is never copied to append it."""
    width, height = image.size
    scale_x, scale_y = width / source_size[0], height / source_size[1]
    band = _legend_height(width) if legend else 0
    pixels = np.full((height + band, width, 3), 255, dtype=np.uint8)
    picture = pixels[:height]
    if image.mode == "L":  # greyscale: copied into the three channels here, never as an RGB image
        picture[...] = np.asarray(image)[..., None]
    else:
        picture[...] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    limit = symmetric_limit(heatmap)
    crop = [crop_box[0] * scale_x, crop_box[1] * scale_y, crop_box[2] * scale_x, crop_box[3] * scale_y]
    for rows, values, inside in _row_blocks(heatmap, crop, width, height):
        colours = colormap(values, limit).astype(np.float32)
        base = picture[rows].astype(np.float32)
        blended = np.floor(base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)
        picture[rows][inside] = blended[inside]  # only pixels inside the crop box change
    out = Image.fromarray(pixels, "RGB")
    del pixels, picture
    if box is not None:
        _draw_box(
            out, (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y), (width, height)
        )
    if band:
        _draw_legend(out, height, limit)
    return out


def _draw_box(image: Image.Image, box: BoxCoords, size: tuple[int, int]) -> None:
    """A black outline with a white inner line, visible on any background (``size``: the picture's,
    which sets the line width)."""
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(size) / 150))
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0), width=line)
    draw.rectangle((x0 + line, y0 + line, x1 - 1 - line, y1 - 1 - line), outline=(255, 255, 255), width=line)


def _legend_height(width: int) -> int:
    """The legend band's height: it grows with the width (readable at any size), up to
    ``LEGEND_MAX_HEIGHT``."""
    return min(LEGEND_MAX_HEIGHT, max(36, width // 12))


def _draw_legend(image: Image.Image, height: int, limit: float) -> None:
    """Draw the colour bar from -limit to +limit and its value labels in the band below row ``height``
    of ``image`` (whose bottom ``_legend_height`` rows are that band)."""
    width = image.size[0]
    band = image.size[1] - height
    image.paste((255, 255, 255), (0, height, width, height + band))  # a box may have reached into it
    font = ImageFont.load_default(size=max(10, band // 3))
    margin = max(4, width // 40)
    bar_w = max(1, width - 2 * margin)
    bar_h = max(6, band // 3)
    ramp = colormap(np.linspace(-limit, limit, bar_w, dtype=np.float32)[None, :].repeat(bar_h, axis=0), limit)
    image.paste(Image.fromarray(ramp, "RGB"), (margin, height + 4))
    draw = ImageDraw.Draw(image)
    label_y = height + 6 + bar_h
    for value, anchor, x in ((-limit, "la", margin), (0.0, "ma", width // 2), (limit, "ra", width - margin)):
        draw.text((x, label_y), f"{value:.3g}", fill=(0, 0, 0), font=font, anchor=anchor)
