"""Uploads the image tests share: encoded images, pixel noise, EXIF orientations, band-wise modes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header (IHDR, with a valid CRC) claims another size; the pixel data is tiny."""
    data = bytearray(encode(Image.new("RGB", (4, 4), (10, 20, 30))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def with_exif(image: Image.Image, orientation: int, fmt: str = "PNG", **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **kwargs)


def noise(width: int, height: int, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixel noise and an alpha plane with opaque, clear and ramped parts: the sharpest content,
    on which a resampling that differs at all (filter positions, order of the passes) shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    alpha = np.where(
        (x // 16 + y // 12) % 3 == 0, 255, np.where((x // 16 + y // 12) % 3 == 1, 0, x * 255 // width)
    )
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), alpha.astype(np.uint8)


BAND_UPLOADS = {  # name -> bytes factory for a width x height picture
    "RGBA PNG": lambda w, h: encode(Image.fromarray(np.dstack(noise(w, h)), "RGBA")),
    "LA PNG": lambda w, h: encode(Image.fromarray(np.dstack([noise(w, h)[0][..., 0], noise(w, h)[1]]), "LA")),
    "palette PNG with transparency": lambda w, h: encode(
        Image.fromarray(noise(w, h)[0]).quantize(64), transparency=0
    ),
    "16-bit grey PNG": lambda w, h: encode(
        Image.fromarray(noise(w, h)[0][..., 1].astype(np.uint16) * 257 + 5)
    ),
    "float TIFF": lambda w, h: encode(
        Image.fromarray(noise(w, h)[0][..., 2].astype(np.float32) / 3 - 7), "TIFF"
    ),
    "1-bit PNG": lambda w, h: encode(Image.fromarray(noise(w, h)[0]).convert("1")),
    "CMYK JPEG": lambda w, h: encode(Image.fromarray(noise(w, h)[0]).convert("CMYK"), "JPEG", quality=95),
    "RGBA PNG, EXIF orientation 6": lambda w, h: with_exif(
        Image.fromarray(np.dstack(noise(h, w)), "RGBA"), 6
    ),
    "CMYK JPEG, EXIF orientation 8": lambda w, h: with_exif(
        Image.fromarray(noise(h, w)[0]).convert("CMYK"), 8, "JPEG", quality=95
    ),
}
