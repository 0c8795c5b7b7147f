"""Selections: caption spans / token ranges -> heatmaps, image boxes -> token scores, and bad selections."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from attribution.errors import InvalidSelection
from attribution.images import preprocess
from attribution.selections import (
    ECHO_CHARS,
    MAX_DIGITS,
    SELECTION_KINDS,
    Box,
    Span,
    TokenRange,
    box_token_scores,
    check_box,
    check_selection,
    parse_indexed,
    selected_tokens,
    selection_from_dict,
    span_heatmap,
)
from attribution.text import tokenize_caption

CAPTION = "a big  dog, on grass"  # tokens: SOT a big dog , on grass EOT


@pytest.fixture()
def setup(tiny_model):
    _, tokens = tokenize_caption(CAPTION, tiny_model)
    _, geometry = preprocess(Image.new("RGB", (320, 320)), tiny_model)  # 4x4 patches of 80x80 pixels
    torch.manual_seed(0)
    result = torch.randn(len(tokens), 4, 4)
    return tokens, geometry, result


def test_span_selects_the_overlapping_tokens(setup):
    tokens, _, result = setup
    assert [t.text for t in tokens[1:-1]] == ["a", "big", "dog", ",", "on", "grass"]
    assert selected_tokens(tokens, Span(2, 5)) == [2]  # "big"
    assert selected_tokens(tokens, Span(3, 4)) == [2]  # inside "big"
    assert selected_tokens(tokens, Span(4, 9)) == [2, 3]  # "g  do": big, dog
    assert selected_tokens(tokens, Span(0, len(CAPTION))) == [1, 2, 3, 4, 5, 6]  # never SOT / EOT
    heat = span_heatmap(result, tokens, Span(4, 9))
    assert heat.shape == (4, 4)
    assert torch.allclose(heat, result[2] + result[3])


def test_token_range(setup):
    tokens, _, result = setup
    assert selected_tokens(tokens, TokenRange(0, 1)) == [0]
    heat = span_heatmap(result, tokens, TokenRange(1, 4))
    assert torch.allclose(heat, result[1:4].sum(0))
    everything = span_heatmap(result, tokens, TokenRange(0, len(tokens)))
    assert torch.allclose(everything, result.sum(0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Span(5, 5), "empty"),
        (lambda: Span(6, 2), "empty"),
        (lambda: Span(-1, 2), "need 0 <= start < end"),
        (lambda: Span(1.5, 3), "integers"),
        (lambda: TokenRange(3, 3), "empty"),
        (lambda: TokenRange(True, 3), "integers"),
        (lambda: Box(10, 10, 5, 20), "empty"),
        (lambda: Box(0, 0, 10, float("inf")), "finite"),
        (lambda: Box(0, 0, "10", 5), "finite numbers"),
    ],
)
def test_malformed_selections(make, message):
    with pytest.raises(InvalidSelection, match=message):
        make()


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Span(10, 40), "out of range: the caption has 20 characters"),
        (Span(6, 7), "covers no token"),  # the second of two spaces
        (TokenRange(2, 9), "out of range: the caption has 8 tokens"),
    ],
)
def test_selections_that_do_not_fit_the_caption(setup, selection, message):
    tokens, _, result = setup
    with pytest.raises(InvalidSelection, match=message):
        span_heatmap(result, tokens, selection)


def test_span_in_truncated_text_covers_no_token(tiny_model):
    caption = "dog " * 80
    _, tokens = tokenize_caption(caption, tiny_model, truncate=True)
    result = torch.zeros(len(tokens), 4, 4)
    with pytest.raises(InvalidSelection, match="covers no token"):
        span_heatmap(result, tokens, Span(len(caption) - 4, len(caption) - 1))


def test_box_scores_weight_patches_by_covered_area(setup):
    tokens, geometry, result = setup
    scores = box_token_scores(result, geometry, Box(40, 0, 200, 80))  # half, full, half of row 0
    inter = result
    expected = 0.5 * inter[:, 0, 0] + inter[:, 0, 1] + 0.5 * inter[:, 0, 2]
    assert scores.shape == (len(tokens),)
    assert torch.allclose(scores, expected, atol=1e-6)
    whole = box_token_scores(result, geometry, Box(0, 0, 320, 320))
    assert torch.allclose(whole, inter.sum(dim=(1, 2)), atol=1e-5)


def test_box_is_in_original_pixels_of_a_cropped_image(tiny_model):
    # 640x480 landscape: the model sees x in [76.19, 563.81]; a box on the left margin misses it
    _, geometry = preprocess(Image.new("RGB", (640, 480)), tiny_model)
    result = torch.ones(3, 4, 4)
    with pytest.raises(InvalidSelection, match="does not overlap the part of the image the model sees"):
        box_token_scores(result, geometry, Box(0, 0, 60, 480))
    with pytest.raises(InvalidSelection, match="outside the 640x480 image"):
        box_token_scores(result, geometry, Box(650, 0, 700, 10))
    # one full patch in original pixels -> exactly that patch's interactions
    x0, y0, x1, y1 = geometry.patch_box(2, 1)
    result[:, 2, 1] = torch.tensor([1.0, 2.0, 3.0])
    scores = box_token_scores(result, geometry, Box(x0, y0, x1, y1))
    assert torch.allclose(scores, torch.tensor([1.0, 2.0, 3.0]))


def test_interactions_of_the_wrong_shape_are_a_programming_error(setup):
    tokens, geometry, _ = setup
    with pytest.raises(ValueError, match="expected"):
        span_heatmap(torch.zeros(3, 4, 4), tokens, Span(0, 1))
    with pytest.raises(ValueError, match="grid"):
        box_token_scores(torch.zeros(8, 5, 5), geometry, Box(0, 0, 10, 10))


@pytest.mark.parametrize(
    ("box", "message"),
    [
        (Box(700, 0, 800, 100), "outside the 640x480 image"),
        (Box(-50, -50, -1, -1), "outside the 640x480 image"),
        (Box(640, 0, 700, 480), "outside the 640x480 image"),  # touches the right edge only
        # inside the image, but left of the region the model sees (x in [76.19, 563.81])
        (Box(0, 0, 50, 50), "does not overlap the part of the image the model sees"),
        (Box(570, 100, 640, 480), "does not overlap the part of the image the model sees"),
    ],
)
def test_check_box_refuses_boxes_the_model_does_not_see(tiny_model, box, message):
    _, geometry = preprocess(Image.new("RGB", (640, 480)), tiny_model)
    with pytest.raises(InvalidSelection, match=message):
        check_box(box, geometry)
    with pytest.raises(InvalidSelection, match=message):  # the same rule wherever a box is used
        box_token_scores(torch.zeros(3, 4, 4), geometry, box)
    _, tokens = tokenize_caption("a dog", tiny_model)
    with pytest.raises(InvalidSelection, match=message):
        check_selection(box, tokens, geometry)


def test_check_box_clips_to_the_image(tiny_model):
    _, geometry = preprocess(Image.new("RGB", (640, 480)), tiny_model)
    assert check_box(Box(-10, -10, 100, 1000), geometry) == (0.0, 0.0, 100.0, 480.0)
    assert check_box(Box(60, 0, 80, 10), geometry) == (60.0, 0.0, 80.0, 10.0)  # overlaps the crop a bit


def test_check_selection_on_spans_matches_selected_tokens(setup):
    tokens, geometry, _ = setup
    check_selection(Span(2, 5), tokens, geometry)
    with pytest.raises(InvalidSelection, match="out of range"):
        check_selection(TokenRange(0, 99), tokens, geometry)


@pytest.mark.parametrize(
    ("cls", "text", "expected"),
    [
        (Span, "2:5", Span(2, 5)),
        (Span, " 2 : 5 ", Span(2, 5)),
        (TokenRange, "0:1", TokenRange(0, 1)),
        (Box, "10,20,110,80", Box(10, 20, 110, 80)),
        (Box, "0.5, 1e1 ,+3,.75e2", Box(0.5, 10, 3, 75)),
    ],
)
def test_parse(cls, text, expected):
    assert cls.parse(text) == expected


@pytest.mark.parametrize(
    ("cls", "text", "message"),
    [
        (Span, "2-5", "malformed: use START:END"),
        (Span, "2:5:7", "malformed"),
        (Span, "1.5:3", "malformed"),
        (Span, "٣:٥", "malformed"),  # non-ASCII digits are not accepted by any of the three parsers
        (Span, "", "malformed"),
        (Span, "5:2", "need 0 <= start < end"),
        (Span, "-1:2", "need 0 <= start < end"),
        (TokenRange, "a:b", "malformed: use START:END with two integers \\(token indices"),
        (TokenRange, "3:3", "empty"),
        (Box, "1,2,3", "malformed: use x0,y0,x1,y1"),
        (Box, "nan,0,1,1", "malformed"),
        (Box, "inf,0,1,1", "malformed"),
        (Box, "1_0,0,20,20", "malformed"),
        (Box, "10,10,5,20", "empty"),
    ],
)
def test_parse_refuses_with_a_message(cls, text, message):
    with pytest.raises(InvalidSelection, match=message):
        cls.parse(text)


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("span", "2:5", (None, Span(2, 5))),
        ("span", "1:2:5", (1, Span(2, 5))),
        ("tokens", "0:1:3", (0, TokenRange(1, 3))),
        ("box", "1,2,3,4", (None, Box(1, 2, 3, 4))),
        ("box", "3:1,2,3,4", (3, Box(1, 2, 3, 4))),
    ],
)
def test_parse_indexed(kind, text, expected):
    assert parse_indexed(kind, text) == expected


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("span", "x:2:5", "caption index 'x' is not a non-negative integer"),
        ("span", "-1:2:5", "caption index '-1'"),
        ("box", "a:1,2,3,4", "caption index 'a'"),
        ("box", "0:1:1,2,3,4", "malformed"),
        ("tokens", "0:1:2:3", "malformed"),
    ],
)
def test_parse_indexed_refuses(kind, text, message):
    with pytest.raises(InvalidSelection, match=message):
        parse_indexed(kind, text)


HUGE = "9" * 5000  # more digits than Python's int() takes from a string (4300): ValueError, not a 422


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("span", f"0:{HUGE}", "at most 9 digits each"),
        ("span", f"{HUGE}:1", "at most 9 digits each"),
        ("tokens", f"-{HUGE}:1", "at most 9 digits each"),
        ("span", f"{HUGE}:0:2", "caption index '9999"),
        ("tokens", f"{HUGE}:0:2", "not a non-negative integer of at most 9 digits"),
        ("box", f"{HUGE}:1,2,3,4", "caption index '9999"),
        ("span", "0:1000000000", "at most 9 digits"),  # 10 digits
        ("span", "1000000000:0:1", "caption index '1000000000'"),
    ],
)
def test_integers_of_too_many_digits_are_an_invalid_selection(kind, text, message):
    with pytest.raises(InvalidSelection, match=message) as info:
        parse_indexed(kind, text)
    assert len(str(info.value)) < 400 and "9" * (ECHO_CHARS + 1) not in str(info.value)


def test_nine_digits_still_parse():
    assert parse_indexed("span", "999999999:0:999999999") == (999_999_999, Span(0, 999_999_999))
    assert MAX_DIGITS == 9


# Selection-like strings: runs of digits (a few, or more than int() takes), separators, signs, spaces.
_PIECES = st.one_of(
    st.from_regex(r"[+-]?[0-9]{1,12}", fullmatch=True),
    st.integers(4290, 4400).map(lambda n: "9" * n),
    st.sampled_from([":", ":", ",", ",", " ", "\t", ".", "e", "-", "+", "\u0663", "\x00", "'"]),
    st.text(max_size=3),
)
_SELECTION_TEXT = st.one_of(st.lists(_PIECES, max_size=12).map("".join), st.text(max_size=60))


@given(kind=st.sampled_from(list(SELECTION_KINDS)), text=_SELECTION_TEXT)
@example(kind="span", text=f"0:{HUGE}")
@example(kind="tokens", text=f"{HUGE}:0:2")
@example(kind="box", text=f"{HUGE}:1,2,3,4")
@example(kind="box", text=f"{HUGE},0,1,1")
@settings(max_examples=400, deadline=None)
def test_parsing_any_text_gives_a_selection_or_a_short_invalid_selection(kind, text):
    """Parsing raises nothing but InvalidSelection, and its message quotes at most ECHO_CHARS of the text."""
    parsers = {
        "indexed": lambda: parse_indexed(kind, text)[1],
        "plain": lambda: SELECTION_KINDS[kind].parse(text),
    }
    for parse in parsers.values():
        try:
            selection = parse()
        except InvalidSelection as exc:
            message = str(exc)
            # the text quoted (repr: at most 4 characters per character) twice, plus the explanation
            assert len(message) <= 2 * (4 * ECHO_CHARS + 40) + 200, message
            if len(text) > ECHO_CHARS:
                assert repr(text)[1:-1] not in message
            continue
        assert isinstance(selection, SELECTION_KINDS[kind])


@pytest.mark.parametrize(
    ("selection", "json_form"),
    [
        (Span(2, 5), {"kind": "span", "start": 2, "end": 5}),
        (TokenRange(1, 3), {"kind": "tokens", "start": 1, "end": 3}),
        (Box(0.5, 1, 20, 10.25), {"kind": "box", "box": [0.5, 1, 20, 10.25]}),
    ],
)
def test_each_selection_has_one_json_form_named_by_its_kind(selection, json_form):
    assert selection.to_dict() == json_form
    assert type(selection).from_dict(json_form) == selection == selection_from_dict(json_form)
    assert SELECTION_KINDS[json_form["kind"]] is type(selection)
    assert type(selection).parse(text_form(selection)) == selection  # the string form: the same value


def text_form(selection) -> str:
    if isinstance(selection, Box):
        return ",".join(str(v) for v in (selection.x0, selection.y0, selection.x1, selection.y1))
    return f"{selection.start}:{selection.end}"


def test_a_selection_of_an_unknown_kind_is_refused():
    with pytest.raises(InvalidSelection, match="kind must be one of span, tokens, box, got 'token_range'"):
        selection_from_dict({"kind": "token_range", "start": 1, "end": 2})
    with pytest.raises(InvalidSelection, match="empty or negative"):  # and the kind's own checks apply
        selection_from_dict({"kind": "span", "start": 3, "end": 3})
