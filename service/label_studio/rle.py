"""Label Studio's brush RLE (thi.ng rle-pack): the ``value.rle`` of a ``brushlabels`` result.

A bit stream, most significant bit first: 32 bits word count, 5 bits word size - 1 (here 8), four
4-bit run-length field sizes - 1 (here 3, 4, 8, 16 bits); then chunks of 1 bit repeat flag, 2 bits
choosing a field size, that many bits of chunk length - 1, and then one word (repeat: the word
``length`` times) or ``length`` words (literal). The last byte is padded with zeros. Label Studio
decodes it to the flat H x W x 4 RGBA bytes of the mask.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 8
LENGTH_BITS = (3, 4, 8, 16)
MAX_CHUNK = 1 << LENGTH_BITS[-1]


class _Bits:
    """Appends unsigned integers of given widths to a bit string, then packs it into bytes."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, value: int, width: int) -> None:
        self.parts.append(format(value, f"0{width}b"))

    def chunk(self, repeat: bool, words: list[int], n: int) -> None:
        """One chunk of ``n`` words: ``words`` is the repeated word, or the ``n`` literal words."""
        size = next(i for i, bits in enumerate(LENGTH_BITS) if n - 1 < 1 << bits)
        self.write(int(repeat), 1)
        self.write(size, 2)
        self.write(n - 1, LENGTH_BITS[size])
        for word in words:
            self.write(int(word), WORD_BITS)

    def to_bytes(self) -> list[int]:
        bits = "".join(self.parts)
        bits += "0" * (-len(bits) % 8)
        return np.packbits(np.frombuffer(bits.encode(), np.uint8) - ord("0")).tolist()


def encode_rle(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 array (e.g. an H x W x 4 RGBA mask, flattened)."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    starts = np.flatnonzero(np.diff(flat, prepend=np.int16(-1)) != 0)
    lengths = np.diff(np.append(starts, len(flat)))
    return _encode(len(flat), flat[starts].tolist(), lengths.tolist())


def mask_rle(mask: np.ndarray) -> list[int]:
    """The RLE of a boolean H x W mask as Label Studio draws it: RGBA white and opaque where True.

    Runs are found on the mask and stretched to 4 bytes a pixel, so no RGBA array is built.
    """
    flat = np.asarray(mask, dtype=bool).ravel()
    starts = np.flatnonzero(np.diff(flat.view(np.uint8), prepend=np.int16(-1)) != 0)
    lengths = np.diff(np.append(starts, len(flat))) * 4
    return _encode(4 * len(flat), np.where(flat[starts], 255, 0).tolist(), lengths.tolist())


def _encode(total: int, values: list[int], lengths: list[int]) -> list[int]:
    """Runs of 2+ equal words become repeat chunks; single words are gathered into literal chunks."""
    out = _Bits()
    out.write(total, 32)
    out.write(WORD_BITS - 1, 5)
    for bits in LENGTH_BITS:
        out.write(bits - 1, 4)
    literal: list[int] = []
    for value, length in zip(values, lengths, strict=True):
        if length == 1:
            literal.append(value)
            continue
        _flush(out, literal)
        for at in range(0, length, MAX_CHUNK):
            out.chunk(True, [value], min(MAX_CHUNK, length - at))
    _flush(out, literal)
    return out.to_bytes()


def _flush(out: _Bits, literal: list[int]) -> None:
    for at in range(0, len(literal), MAX_CHUNK):
        words = literal[at : at + MAX_CHUNK]
        out.chunk(False, words, len(words))
    literal.clear()
