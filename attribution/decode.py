"""Untrusted image bytes to pixels: accepted formats, pixel limits checked from the header, decompression
bombs, progressive JPEGs, and conversion of every mode to RGB or greyscale a band of rows at a time.

``decode_image`` turns untrusted bytes into an upright RGB ``PIL.Image`` (EXIF orientation applied,
first frame of animations, alpha composited on white, 16-bit greyscale scaled down), checking the pixel
count from the header before any pixel data is decoded: against ``max_pixels``, or a share of it for
the kinds of upload whose decoders hold several full-size copies of the image (WebP, AVIF, TIFF,
progressive JPEG: ``FORMAT_PIXEL_PERCENT``, ``pixel_limit``). ``image_size`` runs the same checks on the
header alone. ``decode_scaled`` decodes an upload straight to a picture of bounded size (for heatmap
renders): other modes than RGB and greyscale are converted, and stored images turned upright, a band
of rows at a time (``convert_and_resize_in_bands``), as ``attribution.images.prepare_image`` does.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from attribution.errors import InvalidImage

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
UPRIGHT = {
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


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The upright (width, height) of a stored image of ``size``, or the stored one of an upright one."""
    return (size[1], size[0]) if _turned(orientation) else size


def _upright_region(image: Image.Image, orientation: int, box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` (x0, y0, x1, y1, integers) of the upright image, copied out of the stored ``image`` without
    turning the rest: ``transpose(UPRIGHT[orientation]).crop(box)`` at the size of the box."""
    method = UPRIGHT.get(orientation)
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
    width, height = upright_size(image.size, orientation)
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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
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


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation still to apply to ``img``'s pixels; 1 for a TIFF, whose size Pillow reports
    upright and whose pixels it turns upright itself when loading."""
    if img.format == "TIFF":
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError):
        return 1  # unreadable EXIF: take the pixels as stored, as viewers do


@contextmanager
def decoding(img: Image.Image) -> Iterator[None]:
    """Turns Pillow's errors while decoding ``img``'s pixels into ``InvalidImage`` for broken data."""
    fmt = img.format
    try:
        yield
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{fmt} image data is broken or truncated: {e}") from e


def load_first_frame(img: Image.Image) -> None:
    """Decode the pixels of the first frame (animated GIF/WebP/TIFF), inside ``decoding``."""
    img.seek(0)
    img.load()


def draft(img: Image.Image, upright: tuple[int, int], orientation: int) -> float:
    """Have a JPEG decoded at the smallest DCT scale (1/2, 1/4 or 1/8) whose pixels still cover
    ``upright`` (width, height of the upright image); call before loading. Returns the decoded
    pixels per original pixel: 1 for other formats, or when no reduced scale is that large."""
    if img.format != "JPEG":
        return 1.0
    width = img.width
    drafted = img.draft(None, upright_size(upright, orientation))
    return 1.0 if drafted is None else drafted[1][2] / width  # the draft's exact factor


def _decode(img: Image.Image) -> Image.Image:
    """Decode an opened image to upright RGB; ``InvalidImage`` for broken data."""
    with decoding(img):
        load_first_frame(img)
        method = UPRIGHT.get(exif_orientation(img))  # transposing copies: only for an image to turn
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
    img = open_image(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):
        refuse_elongated(width, height, max_aspect_ratio)
    exif = img.info.get("exif") if img.format == "PNG" else None
    if img.format == "PNG":  # getexif() would decode a PNG to look for a late eXIf chunk
        orientation = Image.Exif()
        if exif:
            orientation.load(exif)
        turned = _turned(orientation.get(ExifTags.Base.Orientation, 1))
    else:
        turned = _turned(exif_orientation(img))
    return (height, width) if turned else (width, height)


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image, or raise ``InvalidImage`` saying why.

    The pixel count is checked from the header (``Image.open`` reads nothing else) before decoding, so a
    decompression bomb costs nothing. Animated images give their first frame.
    """
    return _decode(open_image(data, max_pixels))


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
    img = open_image(data, max_pixels)
    stored = img.size
    with decoding(img):
        if img.format == "JPEG":  # its orientation is in the header: choose the scale before decoding
            orientation = exif_orientation(img)
            draft(img, fit_size(*upright_size(stored, orientation), max_side), orientation)
        load_first_frame(img)
        orientation = exif_orientation(img)
        upright = upright_size(stored, orientation)
        scaled = scaled_rgb_or_grey(img, upright_size(fit_size(*upright, max_side), orientation))
        method = UPRIGHT.get(orientation)
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


def refuse_elongated(width: int, height: int, max_aspect_ratio: float, why: str = "") -> None:
    """Raise the ``InvalidImage`` of an image past ``MAX_ASPECT_RATIO`` (or ``max_aspect_ratio``)."""
    long, short = max(width, height), min(width, height)
    raise InvalidImage(
        f"image is {width}x{height} pixels, an aspect ratio of {long / short:.4g}:1; images whose long "
        f"side exceeds {max_aspect_ratio:g} times their short side are refused{why}; crop the image to "
        "the part to explain"
    )
