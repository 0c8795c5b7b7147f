"""Exceptions raised by the attribution library.

Every error a caller can provoke with bad input derives from ``AttributionError`` and carries a
message that says what was wrong and what is allowed, so the service can pass it on verbatim as a
4xx response.
"""

from __future__ import annotations


class AttributionError(Exception):
    """Base class of all errors caused by the caller's input or configuration."""


class ModelNotAvailable(AttributionError):
    """A model could not be built or its weights could not be had (never replaced by random weights)."""


class UnknownModel(ModelNotAvailable):
    """The architecture name is not an open_clip (or registered) model."""


class UnsupportedModel(AttributionError):
    """The model is an open_clip model whose architecture the engine cannot explain."""


class InvalidOption(AttributionError):
    """An explanation option (layer, steps, precision, device) is out of its allowed range."""


class CaptionError(AttributionError):
    """A caption cannot be explained as given."""


class EmptyCaption(CaptionError):
    """The caption contains no tokens."""


class CaptionTooLong(CaptionError):
    """The caption has more tokens than the model's context length."""

    def __init__(self, n_tokens: int, limit: int) -> None:
        self.n_tokens = n_tokens
        self.limit = limit
        super().__init__(
            f"caption has {n_tokens} tokens including start and end tokens; "
            f"the model's context length is {limit} tokens: shorten the caption"
        )


class CaptionTooManyCharacters(CaptionError):
    """The caption is longer, in characters, than the limit checked before any text processing."""

    def __init__(self, n_chars: int, limit: int) -> None:
        self.n_chars = n_chars
        self.limit = limit
        super().__init__(f"caption has {n_chars} characters; the limit is {limit}: shorten the caption")


class SpecialTokenText(CaptionError):
    """The caption spells one of the tokenizer's control tokens (e.g. ``<end_of_text>``)."""

    def __init__(self, text: str, start: int, end: int) -> None:
        self.text = text
        self.start = start
        self.end = end
        super().__init__(
            f"caption contains {text!r} (characters {start}:{end}), the text of one of the model's "
            "control tokens; the tokenizer would read it as that token, not as words. Remove it or "
            "write it differently (e.g. without the angle brackets)"
        )


class InvalidImage(AttributionError):
    """The image bytes cannot be decoded, or the image is not allowed (size, pixel count)."""


class InvalidSelection(AttributionError):
    """A span, token range or box does not fit the caption or image it refers to."""
