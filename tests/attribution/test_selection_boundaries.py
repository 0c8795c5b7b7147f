"""Boundaries of the selection types that a mutation run of attribution/selections.py found untested
(bench/mutation.py; the score is in BENCHMARKS.md): each test here fails on a mutant that survived the
rest of the fast suite."""

from __future__ import annotations

import dataclasses

import pytest

from attribution import Box, InvalidSelection, Span, TokenRange
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
