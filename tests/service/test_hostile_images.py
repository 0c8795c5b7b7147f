"""A corpus of hostile and unusual images, generated here, each sent over HTTP to both back-ends.

Every file is either explained (200, job done, sane geometry, finite numbers) or refused with a 4xx
whose message names the problem; nothing is enqueued for a refused one, and nothing takes long
(the 30000x30000 PNG bomb is refused from its header, without decoding 2.7 GB of pixel data).
"""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from tests.service.conftest import png_bytes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(width: int = 60, height: int = 40, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(width, height, seed=5))).convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels, about 2.6 MB, built without the pixels.

    Deflate after a full flush starts afresh at a byte boundary, so 100 zero rows compress to the same
    bytes every time and the IDAT is one such block repeated (the Adler-32 of n zeros is (n << 16) | 1).
    """
    row = side + 1  # filter byte + one byte per pixel
    rows_per_block = 100
    z = zlib.compressobj(9)
    block = b"\0" * (row * rows_per_block)
    head = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    repeat = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    assert repeat == z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    tail = bytes([0x03, 0x00])  # final empty fixed-Huffman block
    n_blocks = side // rows_per_block
    adler = struct.pack(">I", ((row * side) % 65521) << 16 | 1)
    idat = head + repeat * (n_blocks - 1) + tail + adler
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def gif_huge_canvas() -> bytes:
    """A GIF whose header declares a 65535x65535 canvas around a 1x1 frame."""
    data = bytearray(_encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def png_zero_width() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (50, 30), colour) for colour in ("red", "green", "blue")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """A 60x40 JPEG whose EXIF says "rotate 90° clockwise to view": upright it is 40x60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo(60, 40), "JPEG", exif=exif.tobytes())


def png16() -> bytes:
    img = Image.new("I;16", (33, 21))
    img.putdata([(i * 997) % 65536 for i in range(33 * 21)])
    return _encode(img, "PNG")


def wrong_magic() -> bytes:
    data = bytearray(png_bytes(20, 20))
    data[1:4] = b"JPG"
    return bytes(data)


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
    b'<circle cx="50" cy="50" r="40" fill="red"/></svg>'
)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"

# name -> (filename, bytes factory, expected upright (width, height) when accepted, else refusal message)
ACCEPTED: dict[str, tuple[str, Callable[[], bytes], tuple[int, int]]] = {
    "animated GIF (first frame)": ("anim.gif", animated_gif, (50, 30)),
    "CMYK JPEG": ("cmyk.jpg", lambda: _encode(_photo(45, 35, "CMYK"), "JPEG"), (45, 35)),
    "16-bit greyscale PNG": ("deep.png", png16, (33, 21)),
    "EXIF-rotated JPEG": ("rotated.jpg", exif_rotated_jpeg, (40, 60)),
    "RGBA PNG": ("alpha.png", lambda: _encode(_photo(30, 30, "RGBA"), "PNG"), (30, 30)),
    "1x1 pixel PNG": ("dot.png", lambda: _encode(Image.new("RGB", (1, 1), "white"), "PNG"), (1, 1)),
    "wide 320x20 PNG (16:1, the most elongated allowed)": (
        "strip.png",
        lambda: _encode(Image.new("RGB", (320, 20), "gray"), "PNG"),
        (320, 20),
    ),
    "JPEG sent as .png": ("photo.png", lambda: _encode(_photo(), "JPEG"), (60, 40)),
}
REFUSED: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "3000x2 PNG": ("strip.png", lambda: _encode(Image.new("RGB", (3000, 2), "gray"), "PNG"), "1500:1"),
    "566-byte 1x250000 PNG": (
        "line.png",
        lambda: _encode(Image.new("L", (1, 250_000), 128), "PNG"),
        "exceeds 16 times their short side",
    ),
    "24000x1 PNG": ("line.png", lambda: _encode(Image.new("L", (24_000, 1), 128), "PNG"), "exceeds 16 times"),
    "wrong magic bytes": ("x.png", wrong_magic, "is not an image in a supported format"),
    "30000x30000 PNG bomb": ("bomb.png", png_bomb, "the limit is 40000000 pixels"),
    "GIF declaring a 65535x65535 canvas": ("canvas.gif", gif_huge_canvas, "the limit is 40000000 pixels"),
    "zero bytes": ("empty.jpg", lambda: b"", "image is empty (0 bytes)"),
    "PNG declaring zero width": ("flat.png", png_zero_width, "declares an empty"),
    "SVG": ("vector.svg", lambda: SVG, "is not an image in a supported format"),
    "EPS (would run Ghostscript)": ("doc.eps", lambda: EPS, "EPS images are not accepted"),
    "text file named .jpg": (
        "notes.jpg",
        lambda: b"Dear diary,\nthis is not a photo.\n",
        "is not an image in a supported format",
    ),
}


def test_the_png_bomb_is_what_it_claims():
    data = png_bomb()
    assert len(data) < 3_000_000
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)  # IHDR width, height
    with pytest.raises(Image.DecompressionBombError, match="900000000 pixels"):
        Image.open(io.BytesIO(data))
    # The first rows decode (the stream is genuine), which is what a naive server would go on doing.
    z = zlib.decompressobj()
    start = data.index(b"IDAT") + 4
    assert z.decompress(data[start : start + 20000], 1_000_000) == b"\0" * 1_000_000


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_but_valid_image_is_explained(stack, case):
    filename, make, (width, height) = ACCEPTED[case]
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": (filename, make())},
            data={"caption": "a thing", "steps": "2", "box": f"0,0,{width},{height}"},
        )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done"
    [caption] = job["result"]["captions"]
    assert (caption["image"]["width"], caption["image"]["height"]) == (width, height)
    assert caption["grid"] == {"rows": 4, "cols": 4}
    numbers = [v for token in caption["interactions"] for row in token for v in row]
    numbers += caption["cls"] + caption["selections"][0]["token_scores"] + [caption["score"]]
    assert len(numbers) > 16 and all(math.isfinite(v) for v in numbers)


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_file_is_refused_with_a_specific_message(stack, case):
    filename, make, message = REFUSED[case]
    data = make()
    before = stack.queue_state()
    t0 = time.monotonic()
    with stack.client() as c:
        r = c.post("/explain", files={"image": (filename, data)}, data={"caption": "a thing"})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert time.monotonic() - t0 < 10
    assert stack.queue_state() == before


def test_truncated_pixel_data_fails_the_job_with_a_422(stack):
    """The API reads only the header (no pixel is decoded there); the worker finds the cut-off data."""
    data = _encode(_photo(200, 200), "JPEG")[:900]
    with stack.client() as c:
        r = c.post("/explain", files={"image": ("cut.jpg", data)}, data={"caption": "a thing"})
    assert r.status_code == 422, r.text
    assert "image data is broken or truncated" in r.json()["detail"]
    assert r.json()["status"] == "failed" and r.json()["error"]["type"] == "InvalidImage"
