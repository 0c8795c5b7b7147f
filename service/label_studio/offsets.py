"""Label Studio text offsets are JavaScript string indices (UTF-16 code units); Python's are code points.

They differ after any character outside the Basic Multilingual Plane (most emoji count 2 in UTF-16).
"""

from __future__ import annotations


def to_utf16(text: str, index: int) -> int:
    """The UTF-16 offset of Python index ``index`` (0..len(text)) of ``text``."""
    return index + sum(1 for ch in text[:index] if ord(ch) > 0xFFFF)


def from_utf16(text: str, offset: int) -> int:
    """The Python index of UTF-16 offset ``offset``; ValueError when it is outside or splits a character."""
    if offset < 0:
        raise ValueError(f"offset {offset} is negative")
    units = 0
    for index, ch in enumerate(text):
        if units == offset:
            return index
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > offset:
            raise ValueError(f"offset {offset} falls inside the character {ch!r} at index {index}")
    if units == offset:
        return len(text)
    raise ValueError(f"offset {offset} is past the end of the text ({units} UTF-16 code units)")
