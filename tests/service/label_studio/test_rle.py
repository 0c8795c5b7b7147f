"""The brush RLE encoder against a decoder written from the format's reference (thi.ng rle-pack decode),
and the block encoder against the pixel-by-pixel encoder it replaced, byte for byte.

Label Studio's own decoder is run on the encoder's output in test_label_studio_e2e.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.label_studio.rle import block_rle, encode_rle, mask_rle


def decode(rle: list[int]) -> np.ndarray:
    """The reference decode: header, then chunks of (repeat bit, size index, length - 1, word(s))."""
    bits = "".join(format(b, "08b") for b in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int(bits[pos : pos + n], 2)
        pos += n
        return value

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out, i = np.zeros(num, np.uint32), 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    assert bits[pos:].strip("0") == "", "only zero padding may follow the last chunk"
    return out.astype(np.uint8)


# Runs of random lengths (up to past the 16-bit chunk limit) of random bytes: long runs and literals.
runs = st.lists(
    st.tuples(st.integers(0, 255), st.sampled_from([1, 1, 2, 3, 8, 9, 255, 256, 257, 70_000])), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(runs)
def test_round_trip(pieces: list[tuple[int, int]]) -> None:
    values = np.concatenate([np.full(n, v, np.uint8) for v, n in pieces]) if pieces else np.zeros(0, np.uint8)
    assert np.array_equal(decode(encode_rle(values)), values)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_mask_is_rgba_white_where_true(height: int, width: int, density: float, seed: int) -> None:
    mask = np.random.default_rng(seed).random((height, width)) < density
    rgba = decode(mask_rle(mask)).reshape(height, width, 4)
    assert np.array_equal(rgba[..., 3] == 255, mask)
    assert np.array_equal(rgba, np.repeat(np.where(mask, 255, 0)[..., None], 4, -1))


def test_large_mask_is_compact() -> None:
    """A 2000x3000 mask with one block: a handful of bytes per row, not per pixel."""
    mask = np.zeros((2000, 3000), bool)
    mask[500:1500, 1000:2000] = True
    rle = mask_rle(mask)
    assert len(rle) < 2000 * 20
    assert np.array_equal(decode(rle)[3::4].reshape(2000, 3000) == 255, mask)


def reference_mask_rle(mask: np.ndarray) -> list[int]:
    """The mask encoder before ``block_rle`` (commit 764af65), self-contained: the runs of the flat
    H x W mask, 4 bytes a pixel, each as repeat chunks of at most 65536 words (a run is never 1 word)."""
    sizes = (3, 4, 8, 16)
    flat = np.asarray(mask, dtype=bool).ravel()
    starts = np.flatnonzero(np.diff(flat.view(np.uint8), prepend=np.int16(-1)) != 0)
    lengths = np.diff(np.append(starts, len(flat))) * 4
    bits = f"{4 * len(flat):032b}{8 - 1:05b}" + "".join(f"{b - 1:04b}" for b in sizes)
    for value, length in zip(np.where(flat[starts], 255, 0).tolist(), lengths.tolist(), strict=True):
        for at in range(0, length, 1 << 16):
            n = min(1 << 16, length - at)
            size = next(i for i, b in enumerate(sizes) if n - 1 < 1 << b)
            bits += f"1{size:02b}{n - 1:0{sizes[size]}b}{value:08b}"
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_reference_is_the_old_encoder() -> None:
    """The digests the encoder of commit 764af65 gave for these masks: the reference is that encoder."""
    rng = np.random.default_rng(7)
    noisy = rng.random((97, 131)) < 0.3
    block = np.zeros((300, 70000 // 4 + 5), bool)  # runs past the 65536-word chunk limit
    block[100:200, 10:] = True
    for mask, digest in [
        (noisy, "ffe9280a986dea1b0007df1ab1887209a666e20aba66dbbf6e90daf036c28db0"),
        (block, "e6c2950b542276f7a10542828ae898049a081a5cc4b5f4fcba7aae5f7de3d7ec"),
    ]:
        assert hashlib.sha256(bytes(reference_mask_rle(mask))).hexdigest() == digest
        assert mask_rle(mask) == reference_mask_rle(mask)


# Blocks of 1 to 300 pixels a side; bands of equal rows merge into runs past the 65536-word limit.
sizes = st.lists(st.sampled_from([1, 1, 2, 3, 7, 60, 300]), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(sizes, sizes, st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_block_mask_is_encoded_as_its_pixels(heights: list[int], widths: list[int], density, seed) -> None:
    """Byte for byte what the old encoder gives for the mask the blocks make, pixel by pixel."""
    cells = np.random.default_rng(seed).random((len(heights), len(widths))) < density
    mask = np.repeat(np.repeat(cells, heights, axis=0), widths, axis=1)
    assert block_rle(cells, np.array(heights), np.array(widths)) == reference_mask_rle(mask)


def test_rows_wider_than_a_chunk() -> None:
    """Runs within a row, and across rows, longer than 65536 bytes: split into chunks the same way."""
    cells = np.array([[True, False, True], [False, True, False], [True, True, True]])
    heights, widths = np.array([5, 2, 3]), np.array([16385, 3, 16385])
    mask = np.repeat(np.repeat(cells, heights, axis=0), widths, axis=1)
    assert block_rle(cells, heights, widths) == reference_mask_rle(mask)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.floats(0, 1), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_any_mask_is_encoded_as_before(height: int, width: int, density: float, band: int, seed: int) -> None:
    """``mask_rle`` finds the bands of equal rows and columns itself (rows repeated ``band`` times)."""
    mask = np.repeat(np.random.default_rng(seed).random((height, width)) < density, band, axis=0)
    assert mask_rle(mask) == reference_mask_rle(mask)
