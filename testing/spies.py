"""Spies on library internals, for tests that assert how much work was done."""

from __future__ import annotations

from typing import Any


def spy_conversions(monkeypatch: Any) -> list[tuple[int, int]]:
    """From now on, the (width, height) of every image ``attribution.decode`` converts to RGB or grey
    (``_to_rgb_or_grey``): a band-wise conversion shows as many bands, a whole one as the full size."""
    from attribution import decode

    sizes: list[tuple[int, int]] = []
    convert = decode._to_rgb_or_grey

    def spy(image: Any, *args: Any) -> Any:
        sizes.append(image.size)
        return convert(image, *args)

    monkeypatch.setattr(decode, "_to_rgb_or_grey", spy)
    return sizes
