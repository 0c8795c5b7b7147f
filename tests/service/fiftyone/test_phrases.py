"""Where a run's captions and phrases come from (no FiftyOne needed: plain values)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from attribution.text import MAX_CAPTION_CHARS
from service.fiftyone.phrases import MAX_PHRASES, PhraseSource, SampleInvalid, labels_of

CAPTION = "a red circle and a blue square"


def test_phrases_field_uses_the_label_studio_rule_whole_words_first():
    source = PhraseSource(caption_field="caption", phrases_field="phrases")
    phrasing = source.phrasing({"caption": "a cat and a cathedral", "phrases": ["cat", [12, 21]]})
    assert phrasing.spans == ((2, 5), (12, 21)) and phrasing.phrase(1) == "cathedral"


def test_no_phrases_means_the_whole_caption():
    phrasing = PhraseSource(caption_field="caption").phrasing({"caption": CAPTION})
    assert phrasing.spans == ((0, len(CAPTION)),)


def test_labels_without_a_caption_are_joined_into_one_each_its_own_span():
    labels = SimpleNamespace(detections=[SimpleNamespace(label=x) for x in ("dog", "red ball", "dog")])
    phrasing = PhraseSource(label_field="gt").phrasing({"gt": labels})
    assert phrasing.caption == "dog, red ball"
    assert [phrasing.phrase(i) for i in range(2)] == ["dog", "red ball"]


def test_a_fixed_list_is_searched_in_each_caption():
    source = PhraseSource(caption_field="caption", phrases=("blue square", "red"))
    phrasing = source.phrasing({"caption": CAPTION})
    assert [phrasing.phrase(i) for i in range(2)] == ["blue square", "red"]


def test_more_phrases_than_max_phrases_are_cut_and_counted():
    source = PhraseSource(caption_field="caption", phrases_field="p", max_phrases=2)
    phrasing = source.phrasing({"caption": CAPTION, "p": ["red", "blue", "circle"] * 1000})
    assert len(phrasing.spans) == 2 and phrasing.cut == 2998


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"caption": ""}, "must be a non-empty string"),
        ({"caption": None}, "must be a non-empty string"),
        ({"caption": "x" * (MAX_CAPTION_CHARS + 1)}, f"the limit is {MAX_CAPTION_CHARS}"),
        ({"caption": CAPTION, "phrases": ["green"]}, "'green' is not in the caption"),
        ({"caption": CAPTION, "phrases": [[5, 500]]}, "does not fit the caption"),
        ({"caption": CAPTION, "phrases": "red"}, "must be a list"),
    ],
)
def test_a_bad_sample_is_refused_with_a_clear_message(values, message):
    with pytest.raises(SampleInvalid, match=message):
        PhraseSource(caption_field="caption", phrases_field="phrases").phrasing(values)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (PhraseSource(), "nothing to explain"),
        (PhraseSource(caption="a", caption_field="c"), "not both"),
        (PhraseSource(caption="a", phrases=("a",), label_field="l"), "at most one"),
        (PhraseSource(phrases=("a",) * (MAX_PHRASES + 1), max_phrases=MAX_PHRASES), "give fewer"),
        (PhraseSource(caption_field="c", max_phrases=MAX_PHRASES + 1), "max_phrases must be between"),
        (PhraseSource(phrases=("a", " ")), "non-empty strings"),
    ],
)
def test_a_source_that_makes_no_sense_is_refused(source, message):
    with pytest.raises(ValueError, match=message):
        source.check()


def test_labels_of_reads_every_label_kind():
    assert labels_of(SimpleNamespace(classifications=[SimpleNamespace(label="a")])) == ["a"]
    assert labels_of(SimpleNamespace(label="b")) == ["b"] and labels_of(None) == []
