"""tokenize_caption: the model tokenizer's exact ids plus each token's span in the original caption."""

from __future__ import annotations

import dataclasses
import random

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attribution import text as text_module
from attribution.errors import (
    CaptionError,
    CaptionTooLong,
    CaptionTooManyCharacters,
    EmptyCaption,
    SpecialTokenText,
    UnsupportedModel,
)
from attribution.text import EOT_TEXT, MAX_CAPTION_CHARS, SOT_TEXT, Token, tokenize_caption

CAPTIONS = [
    "a dog",
    "A photo of a DOG.",
    "  two   cats,  on a mat!! ",
    "3.14159 and 42nd street, 1990s",
    "it’s a “quoted” word — naïve café",
    "Tom &amp; Jerry's house &lt;b&gt; &#39;x&#x27; &copy; &amp;amp;",
    "x < y &amp; z",
    "l1\nl2 <&amp;amp;>",
    "🐶🐱 emoji dogs 👍🏽 and 🇫🇷 flags",
    "don't you'll we've I'm she'd they're",
    "Ünïcödé ÀÉÎÕÜ straße İstanbul ﬁne ＡＢＣ",
    "中文字符 测试 日本語のテキスト",
    "e\u0301cole combining accent",
    "Ã©t mojibake",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp",
    "< start_of_text > spaced-out special text, <end_of_text without its bracket",
    "!!!???...---",
    "UPPER lower MiXeD",
]


def check_invariants(caption: str, ids: torch.Tensor, tokens: list[Token], tokenizer) -> None:
    ref = tokenizer([caption])[0]
    assert torch.equal(ids, ref)
    n = len(tokens)
    assert [t.id for t in tokens] == ref[:n].tolist()
    assert ref[n:].eq(0).all()
    assert [t.index for t in tokens] == list(range(n))
    assert (tokens[0].text, tokens[0].start, tokens[0].end) == (SOT_TEXT, 0, 0)
    assert (tokens[-1].text, tokens[-1].start, tokens[-1].end) == (EOT_TEXT, len(caption), len(caption))
    starts = [t.start for t in tokens[1:-1]]
    assert starts == sorted(starts)
    for t in tokens[1:-1]:
        assert 0 <= t.start < t.end <= len(caption)
        assert t.text == caption[t.start : t.end]
        assert not t.text.isspace() or tokenizer.clean_fn(t.text)  # e.g. U+0085, which ftfy makes "…"


@pytest.mark.parametrize("caption", CAPTIONS)
def test_ids_match_the_model_tokenizer_and_spans_are_sound(caption, tiny_model):
    ids, tokens = tokenize_caption(caption, tiny_model)
    check_invariants(caption, ids, tokens, tiny_model.tokenizer)


def test_random_captions_match_the_tokenizer(tiny_model):
    rng = random.Random(7)
    pieces = [
        "dog",
        "Cat",
        "ÉTÉ",
        "naïve",
        "42",
        "7",
        " ",
        "  ",
        "\t",
        ",",
        ".",
        "'s",
        "'",
        "’",
        "!",
        "&amp;",
        "&lt;",
        "&#39;",
        "&nbsp;",
        "🐶",
        "👍🏽",
        "中",
        "ß",
        "ﬁ",
        "-",
        "(",
        ")",
        '"',
        "a\u0301",
    ]
    checked = 0
    for _ in range(300):
        caption = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        if tiny_model.tokenizer([caption])[0][2] == 0:  # only SOT, EOT: nothing but (escaped) spaces
            with pytest.raises(EmptyCaption):
                tokenize_caption(caption, tiny_model.tokenizer)
            continue
        ids, tokens = tokenize_caption(caption, tiny_model.tokenizer, context_length=77)
        check_invariants(caption, ids, tokens, tiny_model.tokenizer)
        checked += 1
    assert checked > 250


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A photo of a DOG.", ["A", "photo", "of", "a", "DOG", "."]),
        ("  two   cats,  on a mat!! ", ["two", "cats", ",", "on", "a", "mat", "!!"]),
        ("Tom &amp; Jerry's", ["Tom", "&amp;", "Jerry", "'s"]),
        ("it’s café 42", ["it", "’s", "café", "4", "2"]),
        ("🐶 dog", ["🐶", "dog"]),
    ],
)
def test_token_texts_are_the_covered_original_text(caption, expected, tiny_model):
    _, tokens = tokenize_caption(caption, tiny_model)
    assert [t.text for t in tokens[1:-1]] == expected


def test_offsets_point_into_the_original_caption(tiny_model):
    caption = "  Two   CATS &amp; one dog"
    _, tokens = tokenize_caption(caption, tiny_model)
    spans = {t.text: (t.start, t.end) for t in tokens}
    assert spans["Two"] == (2, 5) and spans["CATS"] == (8, 12) and spans["&amp;"] == (13, 18)
    assert spans["dog"] == (23, 26)


def test_caption_too_long(tiny_model):
    caption = "word " * 100
    with pytest.raises(CaptionTooLong) as e:
        tokenize_caption(caption, tiny_model)
    assert (e.value.n_tokens, e.value.limit) == (102, 77)
    assert "102 tokens" in str(e.value) and "77" in str(e.value)
    assert "truncat" not in str(e.value)  # callers (the API) have no truncation option to point to
    # a caption of exactly the context length is fine
    ids, tokens = tokenize_caption("word " * 75, tiny_model)
    assert len(tokens) == 77


def test_truncation_on_request(tiny_model):
    caption = "a dog " * 60
    ids, tokens = tokenize_caption(caption, tiny_model, truncate=True)
    assert len(tokens) == 77 and tokens[-1].text == EOT_TEXT and tokens[-1].start == len(caption)
    assert torch.equal(ids, tiny_model.tokenizer([caption])[0])  # open_clip truncates the same way
    assert tokens[-2].end <= len(caption)


def test_shorter_context_length(tiny_model):
    with pytest.raises(CaptionTooLong) as e:
        tokenize_caption("one two three four", tiny_model, context_length=5)
    assert (e.value.n_tokens, e.value.limit) == (6, 5)
    ids, tokens = tokenize_caption("one two three", tiny_model, context_length=5)
    assert ids.shape == (5,) and len(tokens) == 5


@pytest.mark.parametrize("caption", ["", "   ", "\n\t ", "\u00a0"])
def test_empty_caption(caption, tiny_model):
    with pytest.raises(EmptyCaption, match="empty"):
        tokenize_caption(caption, tiny_model)


def test_not_a_string(tiny_model):
    with pytest.raises(CaptionError, match="must be a string"):
        tokenize_caption(None, tiny_model)  # type: ignore[arg-type]


class _WordTokenizer:
    """A tokenizer without CLIP's BPE internals (stands in for HF / SigLIP tokenizers, not downloadable)."""

    context_length = 77

    def __call__(self, texts, context_length=None):
        return torch.zeros(len(texts), context_length or 77, dtype=torch.long)


def test_non_clip_tokenizer_is_refused():
    with pytest.raises(UnsupportedModel, match="SimpleTokenizer"):
        tokenize_caption("a dog", _WordTokenizer())


def test_tokenizer_with_reduction_mask_is_refused():
    with pytest.raises(UnsupportedModel):
        tokenize_caption("a dog", open_clip.SimpleTokenizer(reduction_mask="simple"))


def test_token_to_dict(tiny_model):
    _, tokens = tokenize_caption("a dog", tiny_model)
    assert tokens[1].to_dict() == {"index": 1, "text": "a", "start": 0, "end": 1}


def test_tokens_are_values_immutable_and_hashable(tiny_model):
    """Equal tokens hash equal (they can key a dict or a set) and none changes once returned."""
    _, tokens = tokenize_caption("a dog, a dog", tiny_model)
    again = tokenize_caption("a dog, a dog", tiny_model)[1]
    assert tokens == again and [hash(t) for t in tokens] == [hash(t) for t in again]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokens[1].text = "cat"  # type: ignore[misc]


def test_case_keeping_tokenizer(tiny_model):
    tokenizer = open_clip.SimpleTokenizer(clean="whitespace")
    caption = "A  Photo of TWO Dogs"
    ids, tokens = tokenize_caption(caption, tokenizer)
    check_invariants(caption, ids, tokens, tokenizer)
    assert ids[:7].tolist() != tiny_model.tokenizer([caption])[0][:7].tolist()  # case did matter


def test_unmirrored_cleaning_falls_back_to_alignment():
    # A tokenizer whose cleaning this module does not mirror step by step: offsets come from aligning
    # the original caption with the cleaned text, and must still be sound.
    tokenizer = open_clip.SimpleTokenizer()
    lower = tokenizer.clean_fn
    tokenizer.clean_fn = lambda text: lower(text).replace("colour", "color")
    caption = "The Colour of  the sky"
    ids, tokens = tokenize_caption(caption, tokenizer)
    check_invariants(caption, ids, tokens, tokenizer)
    assert [t.text for t in tokens[1:-1]] == ["The", "Colour", "of", "the", "sky"]


@pytest.mark.parametrize(
    ("caption", "text", "start"),
    [
        ("a photo <end_of_text> of a red ball", "<end_of_text>", 8),
        ("<start_of_text> literal special", "<start_of_text>", 0),
        ("shouting <END_OF_TEXT> too", "<END_OF_TEXT>", 9),  # lower-cased by the cleaning first
        ("&lt;end_of_text&gt; escaped", "&lt;end_of_text&gt;", 0),  # unescaped by the cleaning first
    ],
)
def test_special_token_text_is_refused(caption, text, start, tiny_model):
    with pytest.raises(SpecialTokenText, match="control tokens") as e:
        tokenize_caption(caption, tiny_model)
    assert (e.value.text, e.value.start, e.value.end) == (text, start, start + len(text))
    assert caption[e.value.start : e.value.end] == text


def test_special_token_text_in_another_case_is_plain_text_for_a_case_keeping_tokenizer():
    tokenizer = open_clip.SimpleTokenizer(clean="whitespace")
    caption = "a photo <END_OF_TEXT> of a red ball"  # no cache hit in open_clip's BPE: ordinary pieces
    ids, tokens = tokenize_caption(caption, tokenizer)
    check_invariants(caption, ids, tokens, tokenizer)
    assert tokenizer.eot_token_id not in [t.id for t in tokens[:-1]]


def test_character_limit_comes_before_any_cleaning(tiny_model):
    hostile = "&" + "amp;" * 4000 + " dog"  # 16 KB whose cleaning took seconds before the length limit
    with pytest.raises(CaptionTooManyCharacters) as e:
        tokenize_caption(hostile, tiny_model)
    assert (e.value.n_chars, e.value.limit) == (16005, MAX_CAPTION_CHARS)
    assert "16005 characters" in str(e.value) and f"limit is {MAX_CAPTION_CHARS}" in str(e.value)
    # only spaces would be an EmptyCaption after cleaning: the length is refused first
    with pytest.raises(CaptionTooManyCharacters):
        tokenize_caption(" " * (MAX_CAPTION_CHARS + 1), tiny_model)
    _, tokens = tokenize_caption("dog" + " " * (MAX_CAPTION_CHARS - 3), tiny_model)  # at the limit: fine
    assert len(tokens) == 3
    with pytest.raises(CaptionTooManyCharacters, match="limit is 10"):
        tokenize_caption("a dog on a mat", tiny_model, max_chars=10)


def test_entity_chain_at_the_limit_is_cleaned_exactly(tiny_model):
    caption = "&" + "amp;" * ((MAX_CAPTION_CHARS - 5) // 4) + " dog"  # the worst case that is accepted
    ids, tokens = tokenize_caption(caption, tiny_model)
    check_invariants(caption, ids, tokens, tiny_model.tokenizer)
    assert [t.text for t in tokens[1:-1]] == [caption[:-4], "dog"]


def test_bpe_memo_stays_bounded(tiny_model, monkeypatch):
    tokenizer = open_clip.SimpleTokenizer()
    monkeypatch.setattr(text_module, "BPE_CACHE_ENTRIES", 50)
    for i in range(40):
        caption = " ".join(f"w{i}x{j}q" for j in range(10))
        ids, tokens = tokenize_caption(caption, tokenizer)
        check_invariants(caption, ids, tokens, tokenizer)
        assert len(tokenizer.cache) <= 50 + 10 * 3
    assert "<end_of_text>" in tokenizer.cache  # special tokens survive a reset


# Captions from anywhere in unicode, plus pieces that exercise the cleaning (entities, quotes, spaces).
_PIECES = [
    "&amp;",
    "&lt;",
    "&gt;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&AMP;",
    "&amp",
    "&",
    "<",
    ">",
    ";",
    "#",
    "amp",
    "’",
    "“",
    "Ã©",
    "\u0301",
    " ",
    "\t",
    "\n",
    "dog",
    "DOG",
    "'s",
    "<end_of_text>",
    "🐶",
]
CAPTION_TEXT = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=25).map("".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caption=CAPTION_TEXT)
def test_any_caption_is_tokenized_exactly_or_refused_with_a_reason(caption, tiny_model):
    tokenizer = tiny_model.tokenizer
    try:
        ids, tokens = tokenize_caption(caption, tiny_model)
    except SpecialTokenText as e:
        assert caption[e.start : e.end] == e.text
        ref = tokenizer([caption])[0].tolist()
        specials = {tokenizer.sot_token_id, tokenizer.eot_token_id}
        truncated = ref[-1] != 0
        assert sum(i in specials for i in ref) >= 3 or truncated  # the tokenizer made a control token
        return
    except EmptyCaption:
        assert tokenizer([caption])[0][1] == tokenizer.eot_token_id
        return
    except CaptionTooLong:
        assert int(tokenizer([caption])[0][-1]) == tokenizer.eot_token_id  # truncated by open_clip
        return
    check_invariants(caption, ids, tokens, tokenizer)


@pytest.mark.parametrize("caption", ["Â\x91Â", "a Â\x91Â b", "Ã©Ã"])
def test_characters_ftfy_inserts_get_a_span_of_the_caption(caption, tiny_model):
    # ftfy turns the mojibake "Â\x91" into "'"; difflib aligns it as an insertion before the "Â" it
    # keeps (found by hypothesis in CI): the inserted token takes the span of the character it precedes.
    ids, tokens = tokenize_caption(caption, tiny_model)
    check_invariants(caption, ids, tokens, tiny_model.tokenizer)
