"""Image decoding and preprocessing that remembers where every model patch lies in the original image.

``decode_image`` turns untrusted bytes into an upright RGB ``PIL.Image`` (EXIF orientation applied,
first frame of animations, alpha composited on white, 16-bit greyscale scaled down), checking the pixel
count from the header before any pixel data is decoded: against ``max_pixels``, or a share of it for
the kinds of upload whose decoders hold several full-size copies of the image (WebP, AVIF, TIFF,
progressive JPEG: ``FORMAT_PIXEL_PERCENT``, ``pixel_limit``). ``preprocess`` runs the model's own open_clip
transform and derives an ``ImageGeometry`` from that transform's parameters (resize, then centre crop
or pad), so heatmaps map back onto the original image and original-pixel boxes map onto patches.
``prepare_image`` does both without a full-size RGB copy of the upload, and ``decode_scaled`` decodes
an upload straight to a picture of bounded size (for heatmap renders): other modes than RGB and
greyscale are converted, and stored images turned upright, a band of rows at a time
(``convert_and_resize_in_bands``).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from PIL import ExifTags, Image, UnidentifiedImageError
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.functional import pil_modes_mapping

from attribution.errors import InvalidImage, InvalidSelection, UnsupportedModel

if TYPE_CHECKING:
    from attribution.models import LoadedModel

# Raster formats a caller may send. Others (EPS runs Ghostscript, PSD, FITS, ...) are refused outright.
Image.init()  # register all plugins, so the list below can be checked against what this Pillow can read
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF") if f in Image.OPEN)
# Transparent pixels are composited on white, as an image viewer on a white page shows them.
ALPHA_BACKGROUND = (255, 255, 255)

# A JPEG that libjpeg decodes through a buffer of all its DCT coefficients (see _jpeg_in_several_scans):
# a kind of upload with a pixel limit of its own, as the formats in FORMAT_PIXEL_PERCENT.
PROGRESSIVE_JPEG = "progressive JPEG"

# Kinds of upload whose decoders hold more than the decoded image while decoding it, with no reduced
# or banded decode that Pillow offers, and the percentage of ``max_pixels`` they may have: so that
# the costliest of each kind costs no more than the costliest upload of any other format at
# ``max_pixels`` (an RGB or RGBA PNG: about 5.5 bytes a pixel at peak, the decoded image, one
# full-size plane and a band). Peak bytes a pixel of each kind's costliest variant, measured with
# Pillow 13 (libwebp 1.6, libavif 1.4 with dav1d, libtiff 4.7, libjpeg-turbo; BENCHMARKS.md,
# "Hostile uploads"), and the share that brings it under that: WebP 16 (libwebp's RGBA canvas and its
# copy, Pillow's copy of that and the image), 25%; AVIF 17 (12-bit 4:4:4 with alpha: the YUVA planes
# at 16 bits, the RGBA result, Pillow's copy of that and the image), 25%; TIFF 12 (a strip or tile
# as large as the image, 16-bit RGBA: 8 bytes a pixel, decoded whole before it is copied into the
# image), 40%; progressive JPEG 9 (every DCT coefficient, 2 bytes a sample: 8 bytes a pixel in CMYK
# 4:4:4, whatever the scale it is decoded at), 50%.
FORMAT_PIXEL_PERCENT = {"WEBP": 25, "AVIF": 25, "TIFF": 40, PROGRESSIVE_JPEG: 50}
_WHY_FEWER_PIXELS = {
    "WEBP": "the WebP decoder holds four copies of the image at once",
    "AVIF": "the AVIF decoder holds the image in four forms at once",
    "TIFF": "a TIFF strip or tile may be decoded whole next to the image",
    PROGRESSIVE_JPEG: "its decoder keeps every DCT coefficient of the image, at any scale",
}
_INSTEAD = {
    "WEBP": "a PNG or JPEG",
    "AVIF": "a PNG or JPEG",
    "TIFF": "a PNG or JPEG",
    PROGRESSIVE_JPEG: "a baseline (sequential) JPEG or a PNG",
}


def pixel_limit(kind: str, max_pixels: int) -> int:
    """The pixel limit of an upload of ``kind`` (a Pillow format name, or ``PROGRESSIVE_JPEG``) where
    ``max_pixels`` is the general one: less for the kinds in ``FORMAT_PIXEL_PERCENT``."""
    return max(1, max_pixels * FORMAT_PIXEL_PERCENT.get(kind, 100) // 100)


# Images whose long side exceeds this many times their short side are refused: the model sees a fixed
# (square, for most models) input, so of such an image it sees a sliver (centre crop) or a few pixel
# rows (padding), and the heatmap would say little about the image.
MAX_ASPECT_RATIO = 16.0

# A JPEG is decoded at a reduced scale only while that keeps this many times the pixels the transform
# resizes to (see prepare_image).
DRAFT_OVERSAMPLING = 4.0

_PIXEL_STEPS = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)  # no geometric effect


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of ``img``; the rules for each source mode are the module's documented behaviour."""
    out = _to_rgb_or_grey(img)
    return out if out.mode == "RGB" else out.convert("RGB")


def _to_rgb_or_grey(img: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """``_to_rgb``, except that greyscale sources stay one-channel ``L`` (a third of the memory; resizing
    commutes with copying L into three channels, so it can come after).

    Every rule is per pixel except ``F``'s, which stretches the image's own min..max: a band of an ``F``
    image is converted with the whole image's ``value_range`` (``_value_range``) to get the same grey.
    """
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba)  # Pillow pastes RGBA onto RGB without a copy, using the alpha band
        return out
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: integer samples taken as 16-bit (0..65535)
        # round(v / 257) in integers: v / 257 is never exactly half-way, as 257 is odd.
        return _rows_to_grey(img, lambda a: (2 * np.clip(a.astype(np.int64), 0, 65535) + 257) // 514)
    if mode == "F":  # floats have no fixed range: stretch min..max to 0..255
        lo, hi = _value_range(img) if value_range is None else value_range
        if not hi > lo:
            return Image.new("L", img.size, 0)
        return _rows_to_grey(img, lambda a: np.nan_to_num((a.astype(np.float64) - lo) / (hi - lo) * 255.0))
    try:  # 1, CMYK, YCbCr, ...: Pillow's own conversion
        return img.convert("L" if mode == "1" else "RGB")
    except ValueError as e:
        raise InvalidImage(f"image mode {mode!r} cannot be converted to RGB; send RGB or greyscale") from e


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of an ``F`` image's samples, NaN ignored ((inf, -inf) if all are NaN)."""
    lo, hi = np.inf, -np.inf
    for rows in _row_chunks(img):
        arr = np.asarray(rows, dtype=np.float64)
        if not np.isnan(arr).all():
            lo, hi = min(lo, float(np.nanmin(arr))), max(hi, float(np.nanmax(arr)))
    return lo, hi


# Source pixels converted at a time: no full-size copy of a large image is made to convert its mode
# (a band of 40 MP 16-bit, float or RGBA pixels is 4 MB).
BAND_PIXELS = 1 << 20


def _rows_per_band(width: int) -> int:
    return max(1, BAND_PIXELS // max(width, 1))


def _row_bands(start: int, stop: int, width: int) -> Iterator[tuple[int, int]]:
    """(top, bottom) of the bands of rows ``start``..``stop`` of a ``width`` pixels wide image."""
    step = _rows_per_band(width)
    for top in range(start, stop, step):
        yield top, min(top + step, stop)


def _row_chunks(img: Image.Image) -> Iterator[Image.Image]:
    for top, bottom in _row_bands(0, img.height, img.width):
        yield img.crop((0, top, img.width, bottom))


def _rows_to_grey(img: Image.Image, to_byte: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """``L`` image of ``to_byte(samples)`` (clipped to 0..255), computed a band of rows at a time."""
    grey = Image.new("L", img.size)
    top = 0
    for rows in _row_chunks(img):
        band = np.clip(to_byte(np.asarray(rows)), 0, 255).astype(np.uint8)
        grey.paste(Image.fromarray(band, "L"), (0, top))
        top += rows.height
    return grey


# EXIF orientation -> the transposition that turns the stored pixels upright (ImageOps.exif_transpose's).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _turned(orientation: int) -> bool:
    """Whether the upright image is the stored one with width and height swapped."""
    return orientation in (5, 6, 7, 8)


def _swapped(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The upright (width, height) of a stored image of ``size``, or the stored one of an upright one."""
    return (size[1], size[0]) if _turned(orientation) else size


def _upright_region(image: Image.Image, orientation: int, box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` (x0, y0, x1, y1, integers) of the upright image, copied out of the stored ``image`` without
    turning the rest: ``transpose(_UPRIGHT[orientation]).crop(box)`` at the size of the box."""
    method = _UPRIGHT.get(orientation)
    if method is None:
        return image.crop(box)
    x0, y0, x1, y1 = box
    if _turned(orientation):  # upright x runs along stored y, upright y along stored x
        x0, y0, x1, y1 = y0, x0, y1, x1
    width, height = image.size
    if orientation in (2, 3, 7, 8):  # stored x runs the other way
        x0, x1 = width - x1, width - x0
    if orientation in (3, 4, 6, 7):  # stored y runs the other way
        y0, y1 = height - y1, height - y0
    return image.crop((x0, y0, x1, y1)).transpose(method)


# Half-widths of Pillow's resampling filters (Resample.c), in output pixels: a filter reaches
# support * max(1, source pixels per output pixel) source pixels either side of a sample point.
_FILTER_SUPPORT = {
    Image.Resampling.NEAREST: 1.0,
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}


def convert_and_resize_in_bands(
    image: Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    box: tuple[float, float, float, float] | None = None,
    *,
    orientation: int = 1,
    exact: bool = True,
) -> Image.Image:
    """``image`` turned upright (EXIF ``orientation``), converted to RGB or ``L`` by ``decode_image``'s
    rules (greyscale kept one channel) and resized to ``size`` from ``box`` (upright pixels; the whole
    image if None) with ``resample``, turning and converting a band of about ``BAND_PIXELS`` source
    pixels at a time: no full-size RGB copy of the image is made.

    ``exact`` (for model inputs): bit for bit the whole converted image's ``resize(size, resample,
    box=box)``, by Pillow's own call on one channel at a time: each channel is filled a band at a time
    into a full-size ``L`` image (a quarter of an RGB copy; rows out of the filter's reach are left
    unfilled), resized, and dropped. Resampling each band on its own cannot be exact: Pillow (13)
    chooses the order of its horizontal and vertical passes from the sizes involved and clips the
    intermediate to 0..255, so a band may be resampled in the other order than the whole image.
    Otherwise (for pictures) each band of output rows is resampled from its own source rows plus the
    filter's reach (``resize(box=...)`` places the filter as for the whole image): the same picture
    up to rounding, in a band's memory whatever the image's size. An image of at most
    ``BAND_PIXELS`` pixels is converted whole; a box of exactly ``size`` pixels at whole-pixel
    positions is copied, as ``resize`` does.
    """
    width, height = _swapped(image.size, orientation)
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    out_w, out_h = size
    value_range = _value_range(image) if image.mode == "F" else None

    def upright(region: tuple[int, int, int, int]) -> Image.Image:
        return _to_rgb_or_grey(_upright_region(image, orientation, region), value_range)

    if (x1 - x0, y1 - y0) == size and float(x0).is_integer() and float(y0).is_integer():
        return upright((int(x0), int(y0), int(x1), int(y1)))
    if width * height <= BAND_PIXELS:  # one band: the whole image's resize itself
        return upright((0, 0, width, height)).resize(size, resample, box=(x0, y0, x1, y1))
    scale = (y1 - y0) / out_h  # source rows per output row
    margin = math.ceil(_FILTER_SUPPORT.get(resample, 3.0) * max(scale, 1.0)) + 2  # the filter's reach
    if exact:
        first, last = max(0, int(y0) - margin), min(height, math.ceil(y1) + margin)
        planes: list[Image.Image] = []
        channels = 1  # RGB or L: known from the first band
        while len(planes) < channels:
            plane = Image.new("L", (width, height))
            for top, bottom in _row_bands(first, last, width):
                band = upright((0, top, width, bottom))
                channels = len(band.getbands())
                plane.paste(band.getchannel(len(planes)), (0, top))
            planes.append(plane.resize(size, resample, box=(x0, y0, x1, y1)))
            del plane
        return planes[0] if channels == 1 else Image.merge("RGB", planes)
    out: Image.Image | None = None
    step = max(1, int(_rows_per_band(width) / scale))  # output rows per band
    for top in range(0, out_h, step):
        bottom = min(out_h, top + step)
        by0 = y0 + (y1 - y0) * top / out_h
        by1 = y1 if bottom == out_h else y0 + (y1 - y0) * bottom / out_h
        r0, r1 = max(0, int(by0) - margin), min(height, math.ceil(by1) + margin)
        band = upright((0, r0, width, r1))
        band = band.resize((out_w, bottom - top), resample, box=(x0, by0 - r0, x1, by1 - r0))
        if out is None:
            out = band if bottom == out_h else Image.new(band.mode, size)
        if out is not band:
            out.paste(band, (0, top))
    assert out is not None  # out_h >= 1
    return out


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled down (never up) so that the long side is at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


REDUCING_GAP = 2.0  # scaled_rgb_or_grey of RGB and grey images: Pillow's reduce-then-resample (Image.resize)


def scaled_rgb_or_grey(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` as RGB or ``L`` (``decode_image``'s mode rules, greyscale kept one channel) at ``size``
    (``BILINEAR``), for pictures rather than model inputs.

    RGB and ``L`` are resized directly (with ``REDUCING_GAP``); every other mode is converted and
    resized a band of output rows at a time (``convert_and_resize_in_bands``, not ``exact``), so no
    full-size RGB copy is made.
    """
    if image.mode in ("RGB", "L"):
        if image.size == size:
            return image
        return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return convert_and_resize_in_bands(image, size, Image.Resampling.BILINEAR, exact=False)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The lazily opened image (header only), after the checks that need no pixel data: the format,
    and the pixel count against ``pixel_limit`` of the upload's kind (``max_pixels`` or a share)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage(f"image is empty (0 bytes); send a file in one of: {', '.join(FORMATS)}")
    try:
        with warnings.catch_warnings():  # our own max_pixels is the limit that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # over Pillow's own limit, far above ours by default
        raise _bomb(data, max_pixels, str(e)) from e
    except UnidentifiedImageError as e:
        raise InvalidImage(_unidentified_reason(bytes(data[:16]), len(data))) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidImage(f"image header is broken: {e}") from e

    width, height = img.size
    kind = _kind(data, img.format)
    limit = pixel_limit(kind, max_pixels)
    if width * height > limit:
        img.close()
        raise _too_many_pixels(kind, f"{width}x{height} = {width * height}", limit)
    tile = _tiff_tile(img)
    if tile is not None and tile[0] * tile[1] > limit:
        img.close()
        raise InvalidImage(
            f"TIFF image is stored in tiles of {tile[0]}x{tile[1]} = {tile[0] * tile[1]} pixels; the limit "
            f"for TIFF tiles is {limit} pixels (a tile is decoded whole, whatever the image's size)"
        )
    return img


def _tiff_tile(img: Image.Image) -> tuple[int, int] | None:
    """(width, height) of a tiled TIFF's tiles. Strips need no check: libtiff clamps a strip to the
    image's height, so none holds more pixels than the image."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or img.format != "TIFF":
        return None
    width, height = tags.get(322), tags.get(323)  # TileWidth, TileLength
    return (int(width), int(height)) if width and height else None


def _kind(data: bytes, fmt: str | None) -> str:
    """What the pixel limit of an upload in format ``fmt`` depends on: ``PROGRESSIVE_JPEG`` for a JPEG
    that libjpeg decodes through all its DCT coefficients, else the format."""
    if fmt in ("JPEG", "MPO") and _jpeg_in_several_scans(data):
        return PROGRESSIVE_JPEG
    return fmt or ""


# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC), and those of progressive frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF_MARKERS = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


def _jpeg_in_several_scans(data: bytes) -> bool:
    """Whether libjpeg decodes this JPEG through a buffer of all its DCT coefficients (2 bytes a sample,
    even when it decodes at a reduced scale): a progressive one, or a sequential one whose first scan
    lacks some of the components (libjpeg's ``has_multiple_scans``). Reads the marker segments up to
    the first start of scan, skipping junk between segments as Pillow and libjpeg do."""
    data = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    pos, end = 2, len(data)  # after SOI
    progressive, components = False, 0
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # no length: stuffing, TEM, RSTn, SOI
            pos += 2
        elif marker == 0xDA:  # SOS: the first scan's component count follows its length
            return progressive or (pos + 4 < end and data[pos + 4] < components)
        else:
            if marker in _SOF_MARKERS and pos + 10 <= end:
                progressive, components = marker in _PROGRESSIVE_SOF_MARKERS, data[pos + 9]
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return progressive


def _too_many_pixels(kind: str, pixels: str, limit: int) -> InvalidImage:
    """The refusal of an upload of ``kind`` with ``pixels`` (a count, or how it was counted) pixels."""
    if kind not in FORMAT_PIXEL_PERCENT:
        return InvalidImage(f"image has {pixels} pixels; the limit is {limit} pixels")
    return InvalidImage(
        f"{kind} image has {pixels} pixels; the limit for {kind} images is {limit} pixels "
        f"({FORMAT_PIXEL_PERCENT[kind]}% of the limit for other images, as {_WHY_FEWER_PIXELS[kind]}); "
        f"scale it down, or send it as {_INSTEAD[kind]}"
    )


def _bomb(data: bytes, max_pixels: int, pillow_message: str) -> InvalidImage:
    """The refusal of an upload that Pillow refused to open as a decompression bomb: our own message,
    with the pixel count Pillow found and the one limit that applies (Pillow's own only where it is
    the lower one)."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Image._decompression_bomb_check's error limit
    pixels = found.group(1) if found else f"more than {pillow_limit}"
    signed = set(_signature_formats(bytes(data[:16])))
    fmt = next((f for f in FORMATS if f in signed), None)  # in the order Image.open tried them
    kind = _kind(data, fmt)
    limit = pixel_limit(kind, max_pixels)
    if 0 < pillow_limit < limit:
        return _too_many_pixels("", pixels, pillow_limit)
    return _too_many_pixels(kind, pixels, limit)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation still to apply to ``img``'s pixels; 1 for a TIFF, whose size Pillow reports
    upright and whose pixels it turns upright itself when loading."""
    if img.format == "TIFF":
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError):
        return 1  # unreadable EXIF: take the pixels as stored, as viewers do


@contextmanager
def _reading(img: Image.Image) -> Iterator[None]:
    """Turns Pillow's errors while decoding ``img``'s pixels into ``InvalidImage`` for broken data."""
    fmt = img.format
    try:
        yield
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{fmt} image data is broken or truncated: {e}") from e


def _load(img: Image.Image) -> None:
    """Decode the pixels of the first frame (animated GIF/WebP/TIFF), inside ``_reading``."""
    img.seek(0)
    img.load()


def _draft(img: Image.Image, upright_size: tuple[int, int], orientation: int) -> float:
    """Have a JPEG decoded at the smallest DCT scale (1/2, 1/4 or 1/8) whose pixels still cover
    ``upright_size`` (width, height of the upright image); call before loading. Returns the decoded
    pixels per original pixel: 1 for other formats, or when no reduced scale is that large."""
    if img.format != "JPEG":
        return 1.0
    width = img.width
    drafted = img.draft(None, _swapped(upright_size, orientation))
    return 1.0 if drafted is None else drafted[1][2] / width  # the draft's exact factor


def _decode(img: Image.Image) -> Image.Image:
    """Decode an opened image to upright RGB; ``InvalidImage`` for broken data."""
    with _reading(img):
        _load(img)
        method = _UPRIGHT.get(_orientation(img))  # transposing copies: only for an image to turn
        return _to_rgb(img if method is None else img.transpose(method))


def image_size(
    data: bytes, *, max_pixels: int = 64_000_000, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> tuple[int, int]:
    """The upright (width, height) of untrusted image bytes from their header, without decoding pixels.

    Runs the checks ``prepare_image`` runs before decoding (format, pixel count, aspect ratio), so a
    service can refuse such uploads, and check boxes against ``transform_geometry``, cheaply. Broken
    pixel data is only found when decoding. EXIF orientation is read where the format keeps it in the
    header (JPEG, WebP, TIFF); a PNG's is found only in chunks before the image data.
    """
    img = _open(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):
        _refuse_elongated(width, height, max_aspect_ratio)
    exif = img.info.get("exif") if img.format == "PNG" else None
    if img.format == "PNG":  # getexif() would decode a PNG to look for a late eXIf chunk
        orientation = Image.Exif()
        if exif:
            orientation.load(exif)
        turned = _turned(orientation.get(ExifTags.Base.Orientation, 1))
    else:
        turned = _turned(_orientation(img))
    return (height, width) if turned else (width, height)


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image, or raise ``InvalidImage`` saying why.

    The pixel count is checked from the header (``Image.open`` reads nothing else) before decoding, so a
    decompression bomb costs nothing. Animated images give their first frame.
    """
    return _decode(_open(data, max_pixels))


def decode_scaled(
    data: bytes, max_side: int, *, max_pixels: int = 64_000_000
) -> tuple[Image.Image, tuple[int, int]]:
    """Untrusted image bytes decoded to an upright RGB or ``L`` image at most ``max_side`` px a side
    (``fit_size``), and the upright original's (width, height).

    The picture is ``decode_image``'s (same checks, modes, orientation, alpha on white) scaled down
    (``scaled_rgb_or_grey``), up to the order of resampling; but no full-size copy is made: a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the output, other modes than
    RGB and greyscale are converted a band at a time, and the EXIF orientation is applied to the
    scaled image. Broken data raises ``InvalidImage``.
    """
    img = _open(data, max_pixels)
    stored = img.size
    with _reading(img):
        if img.format == "JPEG":  # its orientation is in the header: choose the scale before decoding
            orientation = _orientation(img)
            _draft(img, fit_size(*_swapped(stored, orientation), max_side), orientation)
        _load(img)
        orientation = _orientation(img)
        upright = _swapped(stored, orientation)
        scaled = scaled_rgb_or_grey(img, _swapped(fit_size(*upright, max_side), orientation))
        method = _UPRIGHT.get(orientation)
        return (scaled if method is None else scaled.transpose(method)), upright


def _signature_formats(prefix: bytes) -> Iterator[str]:
    """The formats, in Pillow's order, whose signature ``prefix`` (a file's first bytes) has."""
    for fmt, (_factory, accept) in Image.OPEN.items():
        try:
            matches = accept is not None and bool(accept(prefix))
        except Exception:  # noqa: BLE001 - some checks raise on data shorter than their signature
            matches = False
        if matches:
            yield fmt


def _unidentified_reason(prefix: bytes, size: int) -> str:
    """Why Pillow could not open the data: a broken header of a known format, a refused format, or junk."""
    supported = ", ".join(FORMATS)
    fmt = next(_signature_formats(prefix), None)
    if fmt is None:
        return f"data ({size} bytes) is not an image in a supported format; supported: {supported}"
    if fmt in FORMATS:  # the signature matched but the plugin rejected the header
        return (
            f"data starts like a {fmt} image but its header is broken or declares an empty "
            "(zero width or height) image"
        )
    return f"{fmt} images are not accepted; supported: {supported}"


@dataclass(frozen=True)
class ImageGeometry:
    """Where the model's input lies in the original image (after EXIF rotation), in original pixels.

    ``crop_box`` (x0, y0, x1, y1) is the region the model sees (it can reach outside the image where the
    transform pads); patch (row, col) covers ``patch_box(row, col)``; ``patch_size`` is (w, h).
    """

    width: int
    height: int
    crop_box: tuple[float, float, float, float]
    grid: tuple[int, int]
    patch_size: tuple[float, float]

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of patch (row, col) in original pixels."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise InvalidSelection(f"patch ({row}, {col}) is outside the {rows}x{cols} grid")
        pw, ph = self.patch_size
        x0, y0 = self.crop_box[0] + col * pw, self.crop_box[1] + row * ph
        return (x0, y0, x0 + pw, y0 + ph)

    def to_dict(self) -> dict[str, Any]:
        """width, height, crop_box, patch_size (w, h) and grid [rows, cols]; a result's ``image``
        object is this without ``grid`` (which a result gives as ``grid: {rows, cols}``)."""
        return {
            "width": self.width,
            "height": self.height,
            "crop_box": [float(v) for v in self.crop_box],
            "patch_size": [float(v) for v in self.patch_size],
            "grid": list(self.grid),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageGeometry:
        """The inverse of ``to_dict``."""
        x0, y0, x1, y1 = (float(v) for v in d["crop_box"])
        pw, ph = (float(v) for v in d["patch_size"])
        rows, cols = (int(v) for v in d["grid"])
        return cls(int(d["width"]), int(d["height"]), (x0, y0, x1, y1), (rows, cols), (pw, ph))


def _crop_offset(size: int, crop: int) -> int:
    # torchvision center_crop / open_clip center_crop_or_pad: pad (left part floor) if smaller, else crop.
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class _ResizeCrop:
    """An eval transform's geometry: resize the whole image to ``resized`` (w, h), then take the
    ``out`` (w, h) window at ``offset`` (x, y) of the resized image (negative: padding with ``fill``)."""

    width: int
    height: int
    resized: tuple[int, int]
    offset: tuple[int, int]
    out: tuple[int, int]
    resample: Image.Resampling
    fill: Any

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per resized pixel, (x, y)."""
        return self.width / self.resized[0], self.height / self.resized[1]


def _resample(interpolation: Any) -> Image.Resampling:
    if isinstance(interpolation, InterpolationMode):
        return Image.Resampling(pil_modes_mapping[interpolation])
    return Image.Resampling(interpolation)


def _plan(width: int, height: int, transform: Any) -> _ResizeCrop:
    """Read ``transform``'s resize and crop steps (open_clip's eval transforms: resize, then crop/pad)."""
    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    resized, resample = (width, height), Image.Resampling.BICUBIC
    resizes = 0
    crop: tuple[int, int] | None = None
    fill: Any = 0
    for step in steps:
        if isinstance(step, (Resize, ResizeKeepRatio)) and crop is None and resizes == 0:
            resizes += 1
            if isinstance(step, Resize):
                # torchvision's own size arithmetic for Resize (shortest side, or exact (h, w)).
                size = [step.size] if isinstance(step.size, int) else list(step.size)
                new_h, new_w = TF._compute_resized_output_size((height, width), size, step.max_size)
            else:
                new_h, new_w = step.get_params(SimpleNamespace(size=(width, height)), step.size, step.longest)
            resized, resample = (new_w, new_h), _resample(step.interpolation)
        elif isinstance(step, (CenterCrop, CenterCropOrPad)) and crop is None:
            crop_h, crop_w = step.size
            crop = (crop_w, crop_h)
            fill = getattr(step, "fill", 0)
        elif isinstance(step, _PIXEL_STEPS):
            continue
        else:
            raise UnsupportedModel(
                f"image transform step {step!r} is not understood (expected one resize, then one centre "
                "crop or pad); cannot place patches"
            )
    out = crop or resized
    offset = (_crop_offset(resized[0], out[0]), _crop_offset(resized[1], out[1]))
    return _ResizeCrop(width, height, resized, offset, out, resample, fill)


def _refuse_elongated(width: int, height: int, max_aspect_ratio: float, why: str = "") -> None:
    long, short = max(width, height), min(width, height)
    raise InvalidImage(
        f"image is {width}x{height} pixels, an aspect ratio of {long / short:.4g}:1; images whose long "
        f"side exceeds {max_aspect_ratio:g} times their short side are refused{why}; crop the image to "
        "the part to explain"
    )


def _check_aspect_ratio(width: int, height: int, plan: _ResizeCrop, max_aspect_ratio: float) -> None:
    if max(width, height) > max_aspect_ratio * min(width, height) or min(plan.resized) < 1:
        (w, h), (sx, sy) = plan.out, plan.scale
        seen = f"{min(w * sx, width):.4g}x{min(h * sy, height):.4g}"
        why = f" (the model's input is a fixed {w}x{h}, which covers {seen} original pixels of this one)"
        _refuse_elongated(width, height, max_aspect_ratio, why)


def _geometry(plan: _ResizeCrop, patch_size: tuple[int, int], grid: tuple[int, int]) -> ImageGeometry:
    (patch_h, patch_w), (rows, cols) = patch_size, grid
    out_w, out_h = plan.out
    if (out_w, out_h) != (cols * patch_w, rows * patch_h):
        raise UnsupportedModel(
            f"the image transform yields {out_w}x{out_h} pixels but the model expects "
            f"{cols * patch_w}x{rows * patch_h}"
        )
    (sx, sy), (ox, oy) = plan.scale, plan.offset
    return ImageGeometry(
        width=plan.width,
        height=plan.height,
        crop_box=(ox * sx, oy * sy, (ox + out_w) * sx, (oy + out_h) * sy),
        grid=(rows, cols),
        patch_size=(patch_w * sx, patch_h * sy),
    )


def transform_geometry(
    width: int,
    height: int,
    transform: Any,
    patch_size: tuple[int, int],
    grid: tuple[int, int],
) -> ImageGeometry:
    """Follow ``transform``'s resize and crop steps to place its output (and patches) in the original.

    Needs only the image size, so a service can check boxes (``selections.check_box``) before any
    pixel is decoded. ``patch_size`` is (h, w) and ``grid`` (rows, cols) in model-input pixels, as in
    ``LoadedModel``. Model-input coordinate u maps to original x = crop_box[0] + u * scale_x (pixel-edge
    convention).
    """
    return _geometry(_plan(width, height, transform), patch_size, grid)


def _crop_then_resize(
    image: Image.Image, plan: _ResizeCrop, source_scale: float = 1.0, orientation: int = 1
) -> Image.Image:
    """The transform's resize + crop/pad, resampling only the pixels the crop keeps (RGB or ``L``).

    Pillow's ``resize(box=...)`` samples the source at the same points, with the same filter support
    (which may reach outside the box), as resizing the whole image and cropping, so the result equals
    the transform's up to rounding; but nothing larger than the model input is allocated for an RGB
    or ``L`` image, which is resampled as it is (after turning it upright, for a stored ``image`` with
    an EXIF ``orientation``). ``source_scale``: pixels of ``image`` per original pixel (below 1 for a
    JPEG decoded at a reduced scale). Any other mode is turned and converted a band at a time
    (``convert_and_resize_in_bands``, ``exact``: the same result as converting and turning it whole
    first, with one full-size ``L`` plane at a time instead of a full-size RGB copy).
    """
    (rw, rh), (ox, oy), (ow, oh) = plan.resized, plan.offset, plan.out
    ix0, iy0 = max(ox, 0), max(oy, 0)  # resized pixels inside both the image and the crop window
    ix1, iy1 = min(ox + ow, rw), min(oy + oh, rh)
    size = (ix1 - ix0, iy1 - iy0)
    skip = (rw, rh) == (plan.width, plan.height) and source_scale == 1  # torchvision skips such a resize
    if skip:
        box: tuple[float, float, float, float] = (ix0, iy0, ix1, iy1)
    else:
        sx, sy = (v * source_scale for v in plan.scale)
        box = (ix0 * sx, iy0 * sy, ix1 * sx, iy1 * sy)
    method = _UPRIGHT.get(orientation)
    if image.mode not in ("RGB", "L"):
        region = convert_and_resize_in_bands(image, size, plan.resample, box, orientation=orientation)
    elif skip:
        region = (image if method is None else image.transpose(method)).crop((ix0, iy0, ix1, iy1))
    else:
        region = (image if method is None else image.transpose(method)).resize(size, plan.resample, box=box)
    if region.size == (ow, oh):
        return region
    fill = plan.fill if isinstance(plan.fill, (tuple, list)) else (int(plan.fill),) * 3
    canvas = Image.new("RGB", (ow, oh), tuple(fill))
    canvas.paste(region, (ix0 - ox, iy0 - oy))
    return canvas


def _to_tensor(pixels: Any, transform: Any) -> torch.Tensor:
    """The transform's pixel steps (mode, to-tensor, normalise) on the cropped and resized image."""
    for step in transform.transforms if isinstance(transform, Compose) else [transform]:
        if isinstance(step, _PIXEL_STEPS):
            pixels = step(pixels)
    tensor: torch.Tensor = pixels.to(dtype=torch.float32, device="cpu")
    return tensor


@dataclass(frozen=True)
class ModelInput:
    """An image as the model takes it: ``tensor`` (3, H, W) float32 on CPU, and where it lies."""

    tensor: torch.Tensor
    geometry: ImageGeometry


def preprocess(
    image: Image.Image, loaded: LoadedModel, *, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> tuple[torch.Tensor, ImageGeometry]:
    """The model's own transform of ``image`` (float32, (3, H, W), CPU) and where it lies in ``image``.

    Crops to the region the model sees before resizing (see ``_crop_then_resize``), so the work and the
    memory are those of the model input whatever the image's shape (``decode_image``'s mode rules
    apply to a non-RGB ``image``, without a full-size RGB copy). Raises ``InvalidImage`` for an image
    whose long side exceeds ``max_aspect_ratio`` times its short side.
    """
    plan = _plan(image.width, image.height, loaded.transform)
    _check_aspect_ratio(image.width, image.height, plan, max_aspect_ratio)
    geometry = _geometry(plan, loaded.patch_size, loaded.grid)
    pixels = _crop_then_resize(image, plan)  # other modes than RGB and L: converted a band at a time
    return _to_tensor(pixels.convert("RGB"), loaded.transform), geometry


def prepare_image(
    data: bytes,
    loaded: LoadedModel,
    *,
    max_pixels: int = 64_000_000,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    draft_oversampling: float = DRAFT_OVERSAMPLING,
) -> ModelInput:
    """``decode_image`` + ``preprocess`` in one step that keeps memory near the model input's size.

    Refuses a too elongated image from its header, before decoding. A JPEG much larger than the model
    needs is decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT) that keeps at least
    ``draft_oversampling`` times the resolution the transform resizes to (0 disables this); the
    result then differs from full decoding by less than one 8-bit level on most pixels. Other modes
    than RGB and greyscale (alpha, palette, 16-bit, CMYK, ...) are converted (and turned upright) a
    band of rows at a time while the crop region is resampled, with the same result as
    ``decode_image`` + ``preprocess`` but no full-size RGB copy (one full-size one-channel plane at a
    time).
    """
    img = _open(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):  # before decoding (rotation-proof)
        _refuse_elongated(width, height, max_aspect_ratio)
    orientation = _orientation(img)
    upright = _swapped((width, height), orientation)
    plan = _plan(*upright, loaded.transform)
    _check_aspect_ratio(*upright, plan, max_aspect_ratio)
    geometry = _geometry(plan, loaded.patch_size, loaded.grid)

    with _reading(img):
        source_scale = 1.0
        if draft_oversampling > 0:
            want_w, want_h = (int(draft_oversampling * v) + 1 for v in plan.resized)
            source_scale = _draft(img, (want_w, want_h), orientation)
        _load(img)
        pixels = _crop_then_resize(img, plan, source_scale, orientation)
    return ModelInput(_to_tensor(pixels.convert("RGB"), loaded.transform), geometry)
