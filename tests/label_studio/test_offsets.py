"""UTF-16 offsets (Label Studio, JavaScript) against Python indices, emoji included."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.label_studio.offsets import from_utf16, to_utf16

CAPTION = "a 🐕 and a 🐈‍⬛ on the mat"


def test_emoji_shift_offsets() -> None:
    dog, mat = CAPTION.index("🐕"), CAPTION.index("mat")
    assert to_utf16(CAPTION, dog) == dog  # nothing astral before it
    assert to_utf16(CAPTION, dog + 1) == dog + 2  # the dog is two code units
    assert to_utf16(CAPTION, mat) == mat + 2  # dog and cat are astral; the joiner and square are not
    assert from_utf16(CAPTION, mat + 2) == mat
    with pytest.raises(ValueError, match="inside"):
        from_utf16(CAPTION, dog + 1)
    with pytest.raises(ValueError, match="past the end"):
        from_utf16(CAPTION, len(CAPTION.encode("utf-16-le")) // 2 + 1)


@given(st.text(max_size=60), st.data())
def test_matches_utf16_encoding(text: str, data) -> None:
    index = data.draw(st.integers(0, len(text)))
    offset = to_utf16(text, index)
    assert offset == len(text[:index].encode("utf-16-le", "surrogatepass")) // 2
    assert from_utf16(text, offset) == index
