"""Label Studio's brush RLE (thi.ng rle-pack): the ``value.rle`` of a ``brushlabels`` result.

A bit stream, most significant bit first: 32 bits word count, 5 bits word size - 1 (here 8), four
4-bit run-length field sizes - 1 (here 3, 4, 8, 16 bits); then chunks of 1 bit repeat flag, 2 bits
choosing a field size, that many bits of chunk length - 1, and then one word (repeat: the word
``length`` times) or ``length`` words (literal). The last byte is padded with zeros. Label Studio
decodes it to the flat H x W x 4 RGBA bytes of the mask.

A mask is encoded without building that RGBA array, nor the mask itself when it is made of blocks
(``block_rle``): the image rows of one band of blocks are equal, so a band's runs are encoded once.
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

    def text(self) -> str:
        return "".join(self.parts)

    def chunk(self, repeat: bool, words: list[int], n: int) -> None:
        """One chunk of ``n`` words: ``words`` is the repeated word, or the ``n`` literal words."""
        size = next(i for i, bits in enumerate(LENGTH_BITS) if n - 1 < 1 << bits)
        self.write(int(repeat), 1)
        self.write(size, 2)
        self.write(n - 1, LENGTH_BITS[size])
        for word in words:
            self.write(int(word), WORD_BITS)

    def run(self, value: int, length: int) -> None:
        """``length`` times the word ``value``, as repeat chunks of at most ``MAX_CHUNK`` words."""
        for at in range(0, length, MAX_CHUNK):
            self.chunk(True, [value], min(MAX_CHUNK, length - at))

    def to_bytes(self) -> list[int]:
        bits = self.text()
        bits += "0" * (-len(bits) % 8)
        return np.packbits(np.frombuffer(bits.encode(), np.uint8) - ord("0")).tolist()


def encode_rle(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 array (e.g. an H x W x 4 RGBA mask, flattened)."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    starts = np.flatnonzero(np.diff(flat, prepend=np.int16(-1)) != 0)
    lengths = np.diff(np.append(starts, len(flat)))
    return _encode(len(flat), flat[starts].tolist(), lengths.tolist())


def mask_rle(mask: np.ndarray) -> list[int]:
    """The RLE of a boolean H x W mask as Label Studio draws it: RGBA white and opaque where True."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = _band_starts(mask), _band_starts(mask.T)
    heights = np.diff(np.append(rows, mask.shape[0]))
    widths = np.diff(np.append(cols, mask.shape[1]))
    return block_rle(mask[rows][:, cols], heights, widths)


def _band_starts(mask: np.ndarray) -> np.ndarray:
    """The first row of each band of equal rows."""
    changed = (mask[1:] != mask[:-1]).any(axis=1)
    return np.flatnonzero(np.concatenate([[len(mask) > 0], changed]))


def block_rle(cells: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> list[int]:
    """``mask_rle`` of the mask where ``cells[i, j]`` fills ``heights[i]`` rows x ``widths[j]`` columns.

    The work grows with the cells and the output, not with the pixels: the image rows of a band are
    equal, so the bits that repeat from one row to the next are written once and repeated. Heights
    and widths are positive.
    """
    out = _Bits()
    total = 4 * int(np.sum(heights)) * int(np.sum(widths))
    _header(out, total)
    if not total:  # no rows or no columns
        return out.to_bytes()
    last = [0, 0]  # the last run, [word, length]: written once the next run has another word
    for row, height in zip(np.asarray(cells, dtype=bool), np.asarray(heights).tolist(), strict=True):
        runs = _row_runs(row, widths)
        for word, length in runs:  # the band's first image row
            if word == last[0]:
                last[1] += length
            else:
                out.run(*last)
                last = [word, length]
        if len(runs) == 1:  # a row of one word: the band is one run
            last[1] += runs[0][1] * (height - 1)
        elif height > 1:  # each next row: the last run (with the first if it has the same word), the middle
            first, end = runs[0], runs[-1]
            wrap = [[end[0], end[1] + first[1]]] if first[0] == end[0] else [end, first]
            row_bits = _Bits()
            for word, length in wrap + runs[1:-1]:
                row_bits.run(word, length)
            out.parts.append(row_bits.text() * (height - 1))  # ``last`` is still the row's last run
    out.run(*last)
    return out.to_bytes()


def _row_runs(row: np.ndarray, widths: np.ndarray) -> list[list[int]]:
    """[word, length] runs of one image row in RGBA bytes: the row's cells, the equal neighbours merged."""
    starts = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
    lengths = np.add.reduceat(np.asarray(widths), starts).tolist()
    return [[255 if v else 0, 4 * n] for v, n in zip(row[starts].tolist(), lengths, strict=True)]


def _encode(total: int, values: list[int], lengths: list[int]) -> list[int]:
    """Runs of 2+ equal words become repeat chunks; single words are gathered into literal chunks."""
    out = _Bits()
    _header(out, total)
    literal: list[int] = []
    for value, length in zip(values, lengths, strict=True):
        if length == 1:
            literal.append(value)
            continue
        _flush(out, literal)
        out.run(value, length)
    _flush(out, literal)
    return out.to_bytes()


def _header(out: _Bits, total: int) -> None:
    out.write(total, 32)
    out.write(WORD_BITS - 1, 5)
    for bits in LENGTH_BITS:
        out.write(bits - 1, 4)


def _flush(out: _Bits, literal: list[int]) -> None:
    for at in range(0, len(literal), MAX_CHUNK):
        words = literal[at : at + MAX_CHUNK]
        out.chunk(False, words, len(words))
    literal.clear()
