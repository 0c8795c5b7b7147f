"""Peak memory of decoding the costliest upload that each format's own pixel limit accepts.

WebP, AVIF, TIFF and progressive JPEG decoders hold more than the decoded image (see
``attribution.decode.FORMAT_PIXEL_PERCENT``), so those uploads have lower pixel limits. Here the
costliest variant of each, at the largest square its limit accepts under the service's default
``max_pixels``, is prepared for a 224 px model and pictured at 2048 px in a fresh process; the peak
RSS (the kernel's ``VmHWM``) must stay under what the costliest other upload at ``max_pixels``
costs (a 40 MP RGBA PNG: +205 MiB in BENCHMARKS.md, "Hostile uploads"). At the general limit
instead, each costs 300 to 620 MiB.
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from PIL import Image

from attribution import decode

ROOT = Path(__file__).resolve().parents[2]
MAX_PIXELS = 40_000_000  # the service's default EXCLIP_MAX_PIXELS
BOUND_MIB = 205  # the costliest other upload at MAX_PIXELS (40 MP RGBA PNG, worker)

# A 3162x3162 AVIF, 12-bit 4:4:4 with alpha (libavif's avifenc: Pillow writes 8-bit AVIF only), 709
# bytes: the costliest AVIF to decode (about 17 bytes a pixel, against 13 for 8-bit 4:4:4 with alpha).
AVIF_12BIT_444_RGBA_3162 = (
    "AAAAHGZ0eXBhdmlmAAAAAGF2aWZtaWYxbWlhZgAAAY1tZXRhAAAAAAAAAChoZGxyAAAAAAAAAABwaWN0AAAAAAAAAAAAAAAAbGli"
    "YXZpZgAAAAAOcGl0bQAAAAAAAQAAACxpbG9jAAAAAEQAAAIAAQAAAAEAAAIdAAAAqAACAAAAAQAAAbEAAABsAAAAQmlpbmYAAAAA"
    "AAIAAAAaaW5mZQIAAAAAAQAAYXYwMUNvbG9yAAAAABppbmZlAgAAAAACAABhdjAxQWxwaGEAAAAAGmlyZWYAAAAAAAAADmF1eGwA"
    "AgABAAEAAADDaXBycAAAAJ1pcGNvAAAAFGlzcGUAAAAAAAAMWgAADFoAAAAQcGl4aQAAAAADDAwMAAAADGF2MUOBUGAAAAAAE2Nv"
    "bHJuY2x4AAEADQAGgAAAAA5waXhpAAAAAAEMAAAADGF2MUOBUHwAAAAAOGF1eEMAAAAAdXJuOm1wZWc6bXBlZ0I6Y2ljcDpzeXN0"
    "ZW1zOmF1eGlsaWFyeTphbHBoYQAAAAAeaXBtYQAAAAAAAAACAAEEAQKDBAACBAEFhgcAAAEcbWRhdBIACgdcLvFnFnjqMl8Qf4f/"
    "iAAs9cchURGzwfjl07r5Ic88I4pqhhpYj1YI07U+kOHiqQJ2JHeyzRXkYWQBp8qA9cchURGzwfjl07r5Ic88I4pqhhpYj1YI07U+"
    "kOHiqQJ2JHeyzRXkYWQB1BIACgtcLvFnFnjQENBogDKWARB/gf///iAAR/TJ7TbQo1U776Siz0NgaGbMHilI6gY20kuGCFJ09nym"
    "WnChUEnsdm9uJsF70dgvOLckrgSBGRIobUOZc5mrCNQIYVuFSSLL8PTJ7TbQo1U776Siz0NgaGbMHilI6gY20kuGCFJ09nymWnCh"
    "UEnsdm9uJsF70dgvOLckrgSBGRIobUOZc5mrCNQIYVuImQ=="
)

PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    import open_clip
    from attribution import decode, images

    def kib(field):
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))

    data, warm_up = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
    max_pixels = int(sys.argv[3])
    loaded = SimpleNamespace(
        transform=open_clip.image_transform((224, 224), is_train=False), patch_size=(16, 16), grid=(14, 14)
    )
    for upload in (warm_up, data):  # a small upload of the same kind first: one-time allocations
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = kib("VmRSS")
        images.prepare_image(upload, loaded, max_pixels=max_pixels)
        decode.decode_scaled(upload, 2048, max_pixels=max_pixels)
    print((kib("VmHWM") - start) / 1024)
    """
)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def one_strip_rgba16_tiff(side: int) -> bytes:
    """A black, half-transparent ``side`` x ``side`` 16-bit RGBA TIFF, deflated in one strip (Pillow
    cannot write one): libtiff inflates the whole strip, 8 bytes a pixel, before Pillow copies it into
    the image, the costliest TIFF."""
    row = b"\0\0\0\0\0\0\0\x80" * side
    packer = zlib.compressobj(6)
    strip = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    length = len(strip)
    strip += b"\0" * (length % 2)  # the IFD's values start on a word boundary
    header = 8
    bits_at = header + len(strip)
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or offset
        (256, 4, 1, side),  # width
        (257, 4, 1, side),  # height
        (258, 3, 4, bits_at),  # bits per sample: 16, 16, 16, 16 (below)
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, header),  # the strip's offset
        (277, 3, 1, 4),  # samples per pixel
        (278, 4, 1, side),  # rows per strip: all
        (279, 4, 1, length),  # the strip's length
        (338, 3, 1, 2),  # extra sample: unassociated alpha
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", bits_at + 8) + strip + struct.pack("<4H", 16, 16, 16, 16) + ifd


def _side(kind: str) -> int:
    return math.isqrt(decode.pixel_limit(kind, MAX_PIXELS))


COSTLIEST = {  # kind -> (upload at the largest square its limit accepts, a small one to warm up)
    "WEBP": lambda: tuple(
        _encode(Image.new("RGBA", (side, side), (0, 0, 0, 128)), "WEBP", lossless=True)
        for side in (_side("WEBP"), 64)
    ),
    "AVIF": lambda: (
        base64.b64decode(AVIF_12BIT_444_RGBA_3162)
        if _side("AVIF") == 3162
        else pytest.fail("the AVIF limit changed: make the 12-bit AVIF of its side again"),
        _encode(Image.new("RGBA", (64, 64), (0, 0, 0, 128)), "AVIF", subsampling="4:4:4"),
    ),
    "TIFF": lambda: (one_strip_rgba16_tiff(_side("TIFF")), one_strip_rgba16_tiff(64)),
    decode.PROGRESSIVE_JPEG: lambda: tuple(
        _encode(Image.new("CMYK", (side, side)), "JPEG", progressive=True, quality=90)
        for side in (_side(decode.PROGRESSIVE_JPEG), 64)
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's clear_refs")
@pytest.mark.parametrize("kind", list(COSTLIEST))
def test_the_costliest_accepted_upload_of_each_costly_format_stays_in_the_budget(kind, tmp_path):
    if kind not in (decode.PROGRESSIVE_JPEG, *decode.FORMATS):
        pytest.skip(f"this Pillow reads no {kind}")
    data, warm_up = COSTLIEST[kind]()
    width, height = decode.image_size(data, max_pixels=MAX_PIXELS)
    assert width == height == _side(kind) and width * height <= decode.pixel_limit(kind, MAX_PIXELS)
    (tmp_path / "upload").write_bytes(data)
    (tmp_path / "warm_up").write_bytes(warm_up)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "upload"), str(tmp_path / "warm_up"), str(MAX_PIXELS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    added_mib = float(proc.stdout.split()[-1])
    assert 0 < added_mib < BOUND_MIB, f"{kind} {width}x{height}: +{added_mib:.0f} MiB"
