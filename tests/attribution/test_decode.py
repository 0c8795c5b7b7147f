"""decode_image, decode_scaled and image_size: modes, EXIF, bad bytes, pixel limits and bombs."""

from __future__ import annotations

import contextlib
import io
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageOps

from attribution import decode
from attribution.decode import ALPHA_BACKGROUND, decode_image, decode_scaled, image_size
from attribution.errors import InvalidImage
from attribution.images import prepare_image
from testing import spy_conversions
from tests.attribution.image_uploads import BAND_UPLOADS, encode, noise, png_declaring, with_exif

# ---------------------------------------------------------------- decoding


def test_rgb_png_round_trips_exactly():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    img = decode_image(encode(Image.fromarray(pixels)))
    assert img.mode == "RGB" and img.size == (17, 13)
    assert np.array_equal(np.asarray(img), pixels)


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (lambda: Image.new("L", (5, 4), 77), "PNG", (77, 77, 77)),
        (lambda: Image.new("1", (5, 4), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (lambda: Image.new("CMYK", (5, 4), (0, 0, 0, 255)), "TIFF", (0, 0, 0)),
        (lambda: Image.new("I;16", (5, 4), 257 * 100), "PNG", (100, 100, 100)),
        (lambda: Image.new("I;16", (5, 4), 65535), "TIFF", (255, 255, 255)),
        (lambda: Image.new("I", (5, 4), 257 * 200), "TIFF", (200, 200, 200)),
        (lambda: Image.new("YCbCr", (5, 4), (255, 128, 128)), "JPEG", (255, 255, 255)),
    ],
)
def test_modes_become_rgb(make, fmt, expected):
    img = decode_image(encode(make(), fmt))
    assert img.mode == "RGB" and img.size == (5, 4)
    got = np.asarray(img)[1, 2]
    assert np.abs(got.astype(int) - np.array(expected)).max() <= 3, got  # JPEG rounding


def test_palette_images():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    img = decode_image(encode(pal, "GIF"))
    assert img.getpixel((0, 0)) == (10, 20, 30) and img.getpixel((1, 1)) == (200, 100, 50)
    # palette with a transparent index: transparent pixels become the documented background
    img = decode_image(encode(pal, "PNG", transparency=0))
    assert img.getpixel((0, 0)) == ALPHA_BACKGROUND and img.getpixel((1, 1)) == (200, 100, 50)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((1, 1), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 2), (0, 0, 255, 128))  # half blue
    img = decode_image(encode(rgba))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == ALPHA_BACKGROUND == (255, 255, 255)
    assert img.getpixel((1, 1)) == (255, 0, 0)
    assert img.getpixel((2, 2)) == (127, 127, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(encode(la)).getpixel((0, 0)) == (255, 255, 255)


def test_float_images_are_stretched():
    arr = np.linspace(-1.0, 3.0, 20, dtype=np.float32).reshape(4, 5)
    img = decode_image(encode(Image.fromarray(arr, "F"), "TIFF"))
    out = np.asarray(img)[..., 0]
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel().astype(int)) >= 0).all()


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    r, g, b = decode_image(data).getpixel((3, 3))
    assert r > 200 and g < 30 and b < 30


def upright_with_marker(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(img).rectangle((5, 3, 14, 8), fill=(255, 255, 255))  # near the top-left corner
    return img


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(orientation, fmt):
    upright = upright_with_marker(60, 40)
    # store the pixels as a camera would: rotated, with the tag that says how to turn them back
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).size == (40, 60)
    img = decode_image(data)
    assert img.size == (60, 40)
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(upright, dtype=int))
    assert diff.max() <= (0 if fmt == "PNG" else 60) and diff.mean() < 2


# ---------------------------------------------------------------- bad bytes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"empty \(0 bytes\)"),
        (b"this is not an image at all" * 3, "not an image in a supported format"),
        (encode(Image.effect_noise((64, 64), 60).convert("RGB"))[:3000], "PNG image data is broken"),
        (encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:900], "JPEG image data is broken"),
        (encode(Image.new("RGB", (64, 64)))[:30], "starts like a PNG image but its header is broken"),
        (png_declaring(0, 10), "zero width or height"),
        (png_declaring(10, 0), "zero width or height"),
        (encode(Image.new("1", (8, 8)), "XBM"), "XBM images are not accepted"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS images are not accepted"),
    ],
)
def test_bad_bytes_are_refused_with_a_specific_message(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_not_bytes():
    with pytest.raises(InvalidImage, match="must be bytes"):
        decode_image("a string")  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(9_000, 9_000), (60_000, 60_000)])
def test_pixel_bomb_is_refused_from_the_header(width, height):
    # Only the header is real: decoding would fail differently, so the message proves the order.
    data = png_declaring(width, height)
    assert len(data) < 100
    with pytest.raises(InvalidImage, match="pixels") as e:
        decode_image(data, max_pixels=64_000_000)
    assert "64000000" in str(e.value)


def test_max_pixels_boundary():
    data = encode(Image.new("RGB", (100, 50)))
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(InvalidImage, match="100x50 = 5000 pixels; the limit is 4999"):
        decode_image(data, max_pixels=4999)


# ------------------------------------------- pixel limits of formats with costly decoders (issue: F3)


def jpeg_first_scan_with_one_component(data: bytes) -> bytes:
    """``data`` (a baseline three-component JPEG) with its first scan declaring one component: a
    sequential JPEG in several scans as far as the header goes (its pixel data no longer decodes)."""
    sos = data.index(b"\xff\xda")
    assert data[sos + 4] == 3
    return data[: sos + 4] + b"\x01" + data[sos + 5 :]


def colour_noise(width: int, height: int, alpha: bool = False) -> Image.Image:
    rgb, a = noise(width, height)
    return Image.fromarray(np.dstack([rgb, a]), "RGBA") if alpha else Image.fromarray(rgb)


# kind, percent of max_pixels, factory of an upload of that kind of a given (width, height)
COSTLY_UPLOADS = [
    ("WEBP", 25, lambda w, h: encode(colour_noise(w, h), "WEBP", quality=80)),
    ("WEBP", 25, lambda w, h: encode(colour_noise(w, h), "WEBP", lossless=True)),
    ("WEBP", 25, lambda w, h: encode(colour_noise(w, h, alpha=True), "WEBP")),
    ("TIFF", 40, lambda w, h: encode(colour_noise(w, h), "TIFF", compression="tiff_adobe_deflate")),
    ("TIFF", 40, lambda w, h: encode(colour_noise(w, h, alpha=True), "TIFF")),
    ("progressive JPEG", 50, lambda w, h: encode(colour_noise(w, h), "JPEG", progressive=True)),
    (
        "progressive JPEG",
        50,
        lambda w, h: encode(colour_noise(w, h).convert("CMYK"), "JPEG", progressive=True),
    ),
]
if "AVIF" in decode.FORMATS and "AVIF" in Image.SAVE:
    COSTLY_UPLOADS += [
        ("AVIF", 25, lambda w, h: encode(colour_noise(w, h), "AVIF", speed=10)),
        (
            "AVIF",
            25,
            lambda w, h: encode(colour_noise(w, h, alpha=True), "AVIF", speed=10, subsampling="4:4:4"),
        ),
    ]


@pytest.mark.parametrize(("kind", "percent", "make"), COSTLY_UPLOADS)
def test_costly_decoders_have_a_lower_pixel_limit_checked_from_the_header(tiny_model, kind, percent, make):
    """WebP, AVIF, TIFF and progressive JPEG decoders hold several full-size copies of the image, so
    such uploads may have only a share of ``max_pixels``: one pixel more is refused by every entry
    point (from the header, naming the format and its one limit), one at the limit is decoded, and a
    PNG or baseline JPEG of the larger size is still accepted."""
    max_pixels = 4000
    limit = max_pixels * percent // 100
    assert decode.pixel_limit(kind, max_pixels) == limit
    at, over = (50, limit // 50), (51, limit // 50)  # limit is a multiple of 50 here
    assert at[0] * at[1] == limit
    data = make(*over)
    message = (
        rf"^{kind} image has 51x{over[1]} = {51 * over[1]} pixels; the limit for {kind} images is "
        rf"{limit} pixels \({percent}% of the limit for other images, as [^;]+\); scale it down, or send "
        "it as a "
    )
    for refuse in (
        lambda: image_size(data, max_pixels=max_pixels),
        lambda: decode_image(data, max_pixels=max_pixels),
        lambda: prepare_image(data, tiny_model, max_pixels=max_pixels),
        lambda: decode_scaled(data, 64, max_pixels=max_pixels),
    ):
        with pytest.raises(InvalidImage, match=message) as e:
            refuse()
        assert [int(n) for n in re.findall(r"\d{4,}", str(e.value))] == [51 * over[1], limit]
    accepted = make(*at)
    assert image_size(accepted, max_pixels=max_pixels) == at
    assert decode_image(accepted, max_pixels=max_pixels).size == at
    assert prepare_image(accepted, tiny_model, max_pixels=max_pixels).geometry.width == at[0]
    assert decode_scaled(accepted, 64, max_pixels=max_pixels)[1] == at
    for other in (encode(colour_noise(*over)), encode(colour_noise(*over), "JPEG")):
        assert decode_image(other, max_pixels=max_pixels).size == over


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "PPM"])
def test_other_formats_keep_the_general_limit(fmt):
    image = colour_noise(80, 50)
    assert decode.pixel_limit(fmt, 4000) == 4000
    assert decode_image(encode(image, fmt), max_pixels=4000).size == (80, 50)
    with pytest.raises(InvalidImage, match=r"^image has 80x50 = 4000 pixels; the limit is 3999 pixels$"):
        decode_image(encode(image, fmt), max_pixels=3999)


def test_jpegs_decoded_through_all_their_coefficients_are_recognised_from_the_header():
    """Progressive JPEGs, and sequential ones whose first scan lacks a component (libjpeg buffers all
    coefficients of both), are told from baseline ones by the segments before the first scan; segments
    are skipped by their length (a comment holding marker bytes does not count) and junk between
    segments is skipped as libjpeg does."""
    photo = colour_noise(64, 40)
    baseline = encode(photo, "JPEG")
    several = decode._jpeg_in_several_scans
    assert not several(baseline) and not several(encode(photo.convert("L"), "JPEG"))
    assert several(encode(photo, "JPEG", progressive=True))
    assert several(encode(photo.convert("CMYK"), "JPEG", progressive=True))
    assert several(jpeg_first_scan_with_one_component(baseline))
    fake = b"\xff\xc2\x00\x11\x08\x00\x28\x00\x40\x03" + b"\xff\xda\x00\x0c\x01"  # a progressive SOF + SOS
    comment = b"\xff\xfe" + (2 + len(fake)).to_bytes(2, "big") + fake
    assert not several(baseline[:2] + comment + baseline[2:])
    assert several(baseline[:2] + b"junk" + encode(photo, "JPEG", progressive=True)[2:])
    assert not several(b"\xff\xd8") and not several(baseline[:40])  # truncated: no scan, no SOF yet
    limit = decode.pixel_limit(decode.PROGRESSIVE_JPEG, 4000)
    assert limit == 2000 and photo.width * photo.height > limit
    with pytest.raises(InvalidImage, match="the limit for progressive JPEG images is 2000 pixels"):
        image_size(jpeg_first_scan_with_one_component(baseline), max_pixels=4000)
    assert image_size(baseline, max_pixels=4000) == (64, 40)


def webp_declaring(width: int, height: int) -> bytes:
    """A small lossless WebP whose header (VP8L) claims another size."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", bits | (width - 1) | (height - 1) << 14)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "max_pixels", "message"),
    [
        (
            png_declaring(100_000, 100_000),
            40_000_000,
            "image has 10000000000 pixels; the limit is 40000000 pixels",
        ),
        (
            png_declaring(100_000, 100_000),
            10**12,
            "image has 10000000000 pixels; the limit is 178956970 pixels",
        ),
        (
            webp_declaring(16_000, 16_000),
            40_000_000,
            "WEBP image has 256000000 pixels; the limit for WEBP images is 10000000 pixels (25% of",
        ),
    ],
)
def test_pillows_own_bomb_limit_gives_one_message_with_one_limit(data, max_pixels, message):
    """An image over Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS) is refused with
    the pixel count and the one limit that applies: ours, or Pillow's where it is the lower one."""
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    for call in (image_size, decode_image):
        with pytest.raises(InvalidImage) as e:
            call(data, max_pixels=max_pixels)
        assert str(e.value).startswith(message)
        assert "bomb" not in str(e.value) and "exceeds" not in str(e.value)


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_size_reads_the_upright_size_from_the_header(orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", (300, 200), (10, 200, 30)), fmt, exif=exif.tobytes())
    assert image_size(data) == decode_image(data).size == ((300, 200) if orientation == 1 else (200, 300))


def test_image_size_refuses_what_decoding_would(tiny_model):
    with pytest.raises(InvalidImage, match="the limit is 5000 pixels"):
        image_size(encode(Image.new("RGB", (100, 51))), max_pixels=5000)
    with pytest.raises(InvalidImage, match="exceeds 16 times"):
        image_size(png_declaring(1, 250_000))  # the header alone: its pixel data is 4x4
    with pytest.raises(InvalidImage, match="not an image"):
        image_size(b"hello world")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_region_of_the_upright_image_is_cut_from_the_stored_one(orientation):
    """``_upright_region`` equals turning the whole image upright (Pillow's own exif_transpose), then
    cropping, for every orientation and boxes at the edges and inside."""
    stored = Image.fromarray(noise(23, 17)[0])
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(with_exif(stored, orientation))))
    width, height = upright.size
    for box in [(0, 0, width, height), (0, 0, 5, 3), (width - 4, height - 6, width, height), (3, 2, 11, 9)]:
        got = decode._upright_region(stored, orientation, box)
        assert np.array_equal(np.asarray(got), np.asarray(upright.crop(box))), box


def test_decode_scaled_converts_an_rgba_upload_a_band_at_a_time(monkeypatch):
    """A picture of an RGBA upload is never composited onto white at full size: each conversion covers
    one band of rows (BAND_PIXELS plus the filter's reach), and the result has the ``max_side`` size."""
    converted = spy_conversions(monkeypatch)
    monkeypatch.setattr(decode, "BAND_PIXELS", 1 << 16)
    width, height = 1200, 900
    image, size = decode_scaled(BAND_UPLOADS["RGBA PNG"](width, height), 256)
    assert size == (width, height) and image.size == (256, 192) and image.mode == "RGB"
    rows_per_band = (1 << 16) // width
    assert len(converted) >= height // rows_per_band
    assert all(w == width and h <= rows_per_band + 2 * (height / 192 + 3) for w, h in converted), converted


@pytest.mark.parametrize(
    ("orientation", "scaled", "upright"), [(1, (500, 400), (400, 320)), (6, (500, 400), (320, 400))]
)
def test_decode_scaled_decodes_a_large_jpeg_at_a_reduced_scale(monkeypatch, orientation, scaled, upright):
    """A 2000x1600 JPEG pictured at most 400 px a side is decoded at 1/4 scale (500x400, the smallest DCT
    scale still covering the output in its stored orientation), then resized and turned upright."""
    seen: list[tuple[int, int]] = []
    scaled_rgb_or_grey = decode.scaled_rgb_or_grey

    def spy(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        seen.append(image.size)
        return scaled_rgb_or_grey(image, size)

    monkeypatch.setattr(decode, "scaled_rgb_or_grey", spy)
    photo = Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    data = with_exif(photo.resize((2000, 1600)), orientation, "JPEG")
    image, size = decode_scaled(data, 400)
    assert seen == [scaled]
    assert image.size == upright and size == ((2000, 1600) if orientation == 1 else (1600, 2000))


@given(st.binary(max_size=32))
@settings(max_examples=300, deadline=None)
def test_any_few_bytes_are_an_image_or_invalid_image(data: bytes) -> None:
    # Pillow's signature checks of some formats raise on data shorter than their signature (3 bytes
    # gave struct.error: a 500); whatever the bytes, the answer is a size or InvalidImage.
    with contextlib.suppress(InvalidImage):
        image_size(data)


def _one_tile_tiff(side: int, tile: int) -> bytes:
    """A side×side RGBA 16-bit TIFF stored as one deflated tile of tile×tile zero pixels."""
    data = zlib.compress(bytes(tile * tile * 8), 9)
    bits_at, ifd_at = 8, 16  # the four BitsPerSample values, then the IFD (13 entries), then the tile
    data_at = ifd_at + 2 + 13 * 12 + 4

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, kind, count) + packed

    entries = [
        entry(256, 4, 1, side), entry(257, 4, 1, side), entry(258, 3, 4, bits_at), entry(259, 3, 1, 8),
        entry(262, 3, 1, 2), entry(277, 3, 1, 4), entry(284, 3, 1, 1), entry(322, 4, 1, tile),
        entry(323, 4, 1, tile), entry(324, 4, 1, data_at), entry(325, 4, 1, len(data)), entry(338, 3, 1, 2),
        entry(339, 3, 1, 1),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<4H", 16, 16, 16, 16) + ifd + data


def test_a_tiff_tile_past_the_tiff_limit_is_refused_whatever_the_image_size() -> None:
    # A 64x64 image in one 16368x16368 tile cost +2 GiB per decode: libtiff decodes a tile whole.
    limit = decode.pixel_limit("TIFF", 1_000_000)
    big = _one_tile_tiff(64, 1024)  # 1 MP tile
    for check in (image_size, decode_image):
        with pytest.raises(
            InvalidImage, match=f"tiles of 1024x1024 = 1048576 pixels; the limit for TIFF tiles is {limit}"
        ):
            check(big, max_pixels=1_000_000)
    assert image_size(_one_tile_tiff(64, 512), max_pixels=1_000_000) == (64, 64)  # a 262144-pixel tile
    assert decode_image(_one_tile_tiff(64, 512), max_pixels=1_000_000).size == (64, 64)
