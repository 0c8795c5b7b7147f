"""The brush RLE encoder against a decoder written from the format's reference (thi.ng rle-pack decode).

Label Studio's own decoder is run on the encoder's output in test_label_studio_e2e.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.label_studio.rle import encode_rle, mask_rle


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
