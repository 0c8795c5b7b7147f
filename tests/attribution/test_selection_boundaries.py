"""Boundaries of the selection types that a mutation run of attribution/selections.py found untested
(bench/mutation.py; the score is in BENCHMARKS.md): each test here fails on a mutant that survived the
rest of the fast suite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from attribution import (
    Box,
    InvalidSelection,
    Span,
    TokenRange,
    check_box,
    preprocess,
    span_heatmap,
    tokenize_caption,
)
from attribution.selections import ECHO_CHARS


@pytest.mark.parametrize("parse", [Span.parse, TokenRange.parse, Box.parse])
def test_a_refused_text_is_quoted_whole_up_to_the_limit_and_cut_after_it(parse):
    at_limit = "x" * ECHO_CHARS
    with pytest.raises(InvalidSelection) as e:
        parse(at_limit)
    assert repr(at_limit) in str(e.value) and "characters)" not in str(e.value)
    with pytest.raises(InvalidSelection) as e:
        parse(at_limit + "y")
    assert f"{at_limit!r}... ({ECHO_CHARS + 1} characters)" in str(e.value)


@pytest.mark.parametrize("selection", [Span(1, 3), TokenRange(1, 3), Box(0, 0, 5, 5)])
def test_selections_are_values_immutable_and_hashable(selection):
    """Equal selections hash equal, so they can key a dict or a set, and none changes after checking."""
    copy = dataclasses.replace(selection)
    assert copy == selection and hash(copy) == hash(selection)
    assert len({selection, copy}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(selection, dataclasses.fields(selection)[0].name, 0)


@pytest.mark.parametrize("box", [(1, 0, 1, 5), (0, 2, 5, 2)])
def test_a_box_of_zero_width_or_height_is_empty(box):
    with pytest.raises(InvalidSelection, match="is empty"):
        Box(*box)


@pytest.mark.parametrize(
    "box",
    [(640, 0, 700, 10), (100, 480, 200, 500)],  # touching the right / the bottom edge from outside
)
def test_a_box_touching_the_image_from_outside_lies_outside_it(tiny_model, box):
    _, geometry = preprocess(Image.new("RGB", (640, 480)), tiny_model)
    with pytest.raises(InvalidSelection, match="outside the 640x480 image"):
        check_box(Box(*box), geometry)


@pytest.mark.parametrize(
    ("size", "side"),
    [((640, 480), "left"), ((640, 480), "right"), ((480, 640), "top"), ((480, 640), "bottom")],
)
def test_a_box_touching_the_seen_region_from_outside_does_not_overlap_it(tiny_model, size, side):
    """The model sees the centre crop; a box that ends exactly where it begins covers none of it, and
    one a pixel further in does."""
    _, geometry = preprocess(Image.new("RGB", size), tiny_model)
    kx0, ky0, kx1, ky1 = geometry.crop_box
    width, height = size
    # (x0, y0, x1, y1) ending exactly at the crop's edge, and the same box one pixel further in.
    outside, inside = {
        "left": lambda: ((0, 0, kx0, 50), (0, 0, kx0 + 1, 50)),
        "right": lambda: ((kx1, 0, width, 50), (kx1 - 1, 0, width, 50)),
        "top": lambda: ((0, 0, 50, ky0), (0, 0, 50, ky0 + 1)),
        "bottom": lambda: ((0, ky1, 50, height), (0, ky1 - 1, 50, height)),
    }[side]()
    with pytest.raises(InvalidSelection, match="does not overlap the part of the image the model sees"):
        check_box(Box(*outside), geometry)
    check_box(Box(*inside), geometry)  # accepted


def test_interactions_without_a_grid_are_a_programming_error(tiny_model):
    """(tokens, patches) instead of (tokens, rows, cols): refused, not summed along the wrong axis."""
    _, tokens = tokenize_caption("a big dog", tiny_model)
    with pytest.raises(ValueError, match="expected"):
        span_heatmap(torch.zeros(len(tokens), 16), tokens, Span(0, 1))
