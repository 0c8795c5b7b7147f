"""What to explain on one sample: the caption and its phrases' character spans.

One rule for every source, the Label Studio backend's (``service.label_studio.tasks.phrase_spans``):
phrases are strings found in the caption (as whole words where possible) or ``[start, end]``
character offsets; no phrases means the whole caption. The caption comes from a sample field, or is
one text for every sample (a text search's query); without either, the phrases themselves (a fixed
list, or a detection field's labels) are joined into the caption ``"dog, red ball"``, each phrase its
own span. At most ``max_phrases`` are explained per sample (the first ones; the rest are counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attribution.text import MAX_CAPTION_CHARS
from service.errors import RequestInvalid
from service.label_studio.tasks import phrase_spans

MAX_PHRASES = 64
"""The most phrases a run may explain per sample (the service's default ``EXCLIP_MAX_SELECTIONS``)."""
DEFAULT_MAX_PHRASES = 16
JOIN = ", "


class SampleInvalid(ValueError):
    """This sample cannot be explained as it is (recorded in its error field; the run goes on)."""


@dataclass(frozen=True)
class Phrasing:
    """What one sample asks: the caption, the phrases' spans and how many phrases were left out."""

    caption: str
    spans: tuple[tuple[int, int], ...]
    cut: int = 0

    def phrase(self, i: int) -> str:
        start, end = self.spans[i]
        return self.caption[start:end]


@dataclass(frozen=True)
class PhraseSource:
    """Where a run takes captions and phrases from; ``check`` refuses a combination that makes no sense.

    ``caption_field``: a string field with each sample's caption; ``caption``: one text for all samples.
    ``phrases_field``: a list field of strings or ``[start, end]`` pairs per sample; ``phrases``: one
    list for all samples; ``label_field``: a ``Detections``/``Classifications``/``Classification``
    field whose distinct labels are the phrases.
    """

    caption_field: str | None = None
    caption: str | None = None
    phrases_field: str | None = None
    phrases: tuple[str, ...] | None = None
    label_field: str | None = None
    max_phrases: int = DEFAULT_MAX_PHRASES

    def check(self) -> None:
        captions = [x for x in (self.caption_field, self.caption) if x is not None]
        givers = [x for x in (self.phrases_field, self.phrases, self.label_field) if x is not None]
        if len(captions) > 1:
            raise ValueError("give caption_field or caption, not both")
        if len(givers) > 1:
            raise ValueError("give at most one of phrases_field, phrases and label_field")
        if not captions and not givers:
            raise ValueError("nothing to explain: give caption_field, caption, phrases or label_field")
        if not 1 <= self.max_phrases <= MAX_PHRASES:
            raise ValueError(f"max_phrases must be between 1 and {MAX_PHRASES}, got {self.max_phrases}")
        if self.phrases is not None:
            if len(self.phrases) > self.max_phrases:
                raise ValueError(
                    f"{len(self.phrases)} phrases given; at most max_phrases={self.max_phrases} are "
                    "explained per sample: give fewer"
                )
            if not all(isinstance(p, str) and p.strip() for p in self.phrases):
                raise ValueError("phrases must be non-empty strings")
        if self.caption is not None:
            _checked_caption(self.caption)

    @property
    def read_fields(self) -> list[str]:
        """The sample fields a run reads (besides ``filepath``)."""
        return [f for f in (self.caption_field, self.phrases_field, self.label_field) if f is not None]

    def phrasing(self, values: dict[str, Any]) -> Phrasing:
        """The sample's caption and spans from its ``read_fields`` values; ``SampleInvalid`` if bad."""
        given = self._given_phrases(values)
        caption = self.caption if self.caption_field is None else values.get(self.caption_field)
        if caption is None and self.caption_field is None:  # the phrases make the caption
            unique = list(dict.fromkeys(p for p in given or [] if isinstance(p, str) and p.strip()))
            if not unique:
                raise SampleInvalid(f"no phrases: {self._origin()} is empty")
            kept = unique[: self.max_phrases]
            caption = _checked_caption(JOIN.join(kept))
            starts = [sum(len(p) + len(JOIN) for p in kept[:i]) for i in range(len(kept))]
            spans = tuple((s, s + len(p)) for s, p in zip(starts, kept, strict=True))
            return Phrasing(caption, spans, cut=len(unique) - len(kept))
        caption = _checked_caption(caption, self.caption_field)
        try:
            found = phrase_spans(caption, given, self.max_phrases)
        except RequestInvalid as exc:
            raise SampleInvalid(str(exc)) from exc
        cut = max(0, len(given) - self.max_phrases) if isinstance(given, list) else 0
        return Phrasing(caption, tuple(found), cut=cut)

    def _given_phrases(self, values: dict[str, Any]) -> Any:
        if self.phrases is not None:
            return list(self.phrases)
        if self.phrases_field is not None:
            return values.get(self.phrases_field)
        if self.label_field is not None:
            return labels_of(values.get(self.label_field))
        return None

    def _origin(self) -> str:
        if self.label_field is not None:
            return f"the labels of field {self.label_field!r}"
        return "the phrases"


def labels_of(value: Any) -> list[str]:
    """The labels of a ``Detections``/``Classifications``/``Classification`` value, in order."""
    if value is None:
        return []
    for attribute in ("detections", "classifications"):
        items = getattr(value, attribute, None)
        if items is not None:
            return [str(item.label) for item in items if item.label]
    label = getattr(value, "label", None)
    return [str(label)] if label else []


def _checked_caption(caption: Any, field: str | None = None) -> str:
    where = f"field {field!r}" if field else "the caption"
    if not isinstance(caption, str) or not caption.strip():
        raise SampleInvalid(f"{where} must be a non-empty string, got {str(caption)[:40]!r}")
    if len(caption) > MAX_CAPTION_CHARS:
        raise SampleInvalid(
            f"{where} has {len(caption)} characters; the limit is {MAX_CAPTION_CHARS}: shorten it"
        )
    return caption
