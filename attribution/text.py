"""Caption tokenisation that keeps, for every token, the characters of the original caption it covers.

open_clip's ``SimpleTokenizer`` first cleans the caption (ftfy fix, HTML unescape twice, whitespace
collapse, lower-casing), then splits it with a regex and byte-pair-encodes each piece. Here the
tokenizer's own cleaning runs once; a mirror of its steps tracks, for every character of the cleaned
text, the span of the original caption it came from (or, where the mirror disagrees, an alignment
does), so each BPE token can be mapped back to ``caption[start:end]``. The regex and BPE are the
tokenizer's own, run once, so the ids are exactly what the tokenizer gives.

Hugging Face tokenizers (open_clip's ``HFTokenizer``) go through ``attribution.tokenizers``, reusing the
tracked cleaning here; ``tokenize_caption`` is the one dispatch point between the two families.

Literal special-token text (``<end_of_text>``, in any case the cleaning lowers) is refused with
``SpecialTokenText`` rather than encoded: the tokenizer turns it into its control token, and the model
then reads the caption as ending there, so the explanation could not cover the words after it.
"""

from __future__ import annotations

import difflib
import html
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import ftfy
import torch

from attribution.errors import (
    CaptionError,
    CaptionTooLong,
    CaptionTooManyCharacters,
    EmptyCaption,
    SpecialTokenText,
    UnsupportedModel,
)

if TYPE_CHECKING:
    from attribution.tokenizers import HFTokenizer

# Longest caption accepted, in characters, checked before any cleaning: open_clip's cleaning (ftfy's
# fixed point over HTML entities) costs more than linear time in the worst case, and no caption that
# fits a 77-token context needs more (a full context of English is about 350 characters).
MAX_CAPTION_CHARS = 1000
# Words kept in the tokenizer's BPE memo before it is reset (open_clip's grows without bound).
BPE_CACHE_ENTRIES = 100_000

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"

# Each character of a (partly) cleaned text maps to the [start, end) span of the original caption.
Spans = list[tuple[int, int]]


@dataclass(frozen=True)
class Token:
    """One token of a caption: its position, vocabulary id, readable text and original character span."""

    index: int
    id: int | None  # None for tokens read back from a result, which leaves ids out
    text: str
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in results (``index``, ``text``, ``start``, ``end``)."""
        d = asdict(self)
        del d["id"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Token:
        """The inverse of ``to_dict``; ``id`` is None (results do not carry vocabulary ids)."""
        return cls(int(d["index"]), None, str(d["text"]), int(d["start"]), int(d["end"]))


def _align(old: str, old_spans: Spans, new: str) -> Spans:
    """Spans for ``new`` after an opaque rewrite of ``old`` (ftfy): replaced runs map to the whole old run."""
    if new == old:
        return list(old_spans)
    spans: Spans = []
    ops = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    for op, i1, i2, j1, j2 in ops:
        if op == "equal":
            spans.extend(old_spans[i1:i2])
        elif op == "replace":
            spans.extend([(old_spans[i1][0], old_spans[i2 - 1][1])] * (j2 - j1))
        elif op == "insert":  # characters without a source: the span of the character they precede
            near = old_spans[i1] if i1 < len(old_spans) else old_spans[-1] if old_spans else (0, 0)
            spans.extend([near] * (j2 - j1))
        elif spans and not old[i1:i2].isspace():  # dropped characters belong to the one before them
            spans[-1] = (spans[-1][0], max(spans[-1][1], old_spans[i2 - 1][1]))
    return spans


class Tokenizer(Protocol):
    """What this module uses of open_clip's ``SimpleTokenizer`` (CLIP's byte-pair encoder)."""

    pat: re.Pattern[str]
    encoder: dict[str, int]
    decoder: dict[int, str]
    byte_encoder: dict[int, str]
    cache: dict[str, str]
    clean_fn: Callable[[str], str]
    all_special_ids: list[int]
    sot_token_id: int
    eot_token_id: int
    context_length: int

    def bpe(self, token: str) -> str: ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def __call__(self, texts: str | list[str]) -> torch.Tensor: ...


def _unescape(text: str, spans: Spans) -> tuple[str, Spans]:
    """``html.unescape`` with tracking: every replacement character maps to its whole entity."""
    out: list[str] = []
    out_spans: Spans = []
    pos = 0
    charref: re.Pattern[str] = html._charref  # type: ignore[attr-defined]  # private, untyped
    for m in charref.finditer(text):  # the exact regex html.unescape uses
        out.append(text[pos : m.start()])
        out_spans.extend(spans[pos : m.start()])
        repl = html._replace_charref(m)
        out.append(repl)
        # Text left as it was (not an entity, or the tail after an entity prefix) keeps its own spans.
        kept = len(os.path.commonprefix([repl[::-1], m.group()[::-1]]))
        if repl != m.group():
            kept = min(kept, len(m.group()) - 1)  # the replaced head is at least one character
        head_end = m.end() - kept
        head = (spans[m.start()][0], spans[max(head_end, m.start() + 1) - 1][1])
        out_spans.extend([head] * (len(repl) - kept))
        out_spans.extend(spans[head_end : m.end()])
        pos = m.end()
    out.append(text[pos:])
    out_spans.extend(spans[pos:])
    return "".join(out), out_spans


def _collapse_whitespace(text: str, spans: Spans) -> tuple[str, Spans]:
    """``" ".join(text.split())`` with tracking (also covers the tokenizer's ``strip()`` calls)."""
    out: list[str] = []
    out_spans: Spans = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            j = i
            while j < n and text[j].isspace():
                j += 1
            if out and j < n:  # interior run of whitespace -> one space
                out.append(" ")
                out_spans.append((spans[i][0], spans[j - 1][1]))
            i = j
        else:
            out.append(text[i])
            out_spans.append(spans[i])
            i += 1
    return "".join(out), out_spans


def _lower(text: str, spans: Spans) -> tuple[str, Spans]:
    out_spans: Spans = []
    for ch, span in zip(text, spans, strict=True):
        out_spans.extend([span] * len(ch.lower()))  # some characters lower to two
    return text.lower(), out_spans


def _canonicalize(text: str, spans: Spans) -> tuple[str, Spans]:
    """open_clip's ``canonicalize_text`` with tracking: ``_`` -> space, ASCII punctuation dropped, lowered.

    Dropped characters belong to no cleaned character, so no token covers them.
    """
    kept = [("_" == ch and " ") or ch for ch in text]
    pairs = [(ch, span) for ch, span in zip(kept, spans, strict=True) if ch not in string.punctuation]
    text, spans = _lower("".join(ch for ch, _ in pairs), [span for _, span in pairs])
    return _collapse_whitespace(text, spans)


def _mirror_cleaning(caption: str, clean_fn: Callable[[str], str]) -> tuple[str, Spans]:
    """open_clip's ``basic_clean`` + whitespace / lower / canonicalize clean, step by step, tracking spans."""
    text, spans = caption, [(i, i + 1) for i in range(len(caption))]
    if "<" not in text:  # ftfy's default unescape_html="auto" unescapes, repeatedly, text without "<"
        previous = None
        while text != previous:
            previous = text
            text, spans = _unescape(text, spans)
    fixed = ftfy.fix_text(text, unescape_html=False)
    text, spans = fixed, _align(text, spans, fixed)
    text, spans = _unescape(*_unescape(text, spans))  # basic_clean's own two html.unescape calls
    if clean_fn.__name__ == "_clean_canonicalize":
        return _canonicalize(text, spans)
    text, spans = _collapse_whitespace(text, spans)
    if clean_fn.__name__ == "_clean_lower":
        text, spans = _lower(text, spans)
    return text, spans


def clean_with_spans(caption: str, clean_fn: Callable[[str], str]) -> tuple[str, Spans]:
    """The tokenizer's own cleaning of ``caption`` (run once), with each cleaned character's span."""
    cleaned = clean_fn(caption)
    text, spans = _mirror_cleaning(caption, clean_fn)
    if text != cleaned:  # a cleaning step we do not mirror exactly: fall back to a generic alignment
        return cleaned, _align(caption, [(i, i + 1) for i in range(len(caption))], cleaned)
    return text, spans


def _special_texts(tokenizer: Tokenizer) -> set[str]:
    return {tokenizer.decoder[i] for i in tokenizer.all_special_ids}


def _bpe(tokenizer: Tokenizer, word: str) -> str:
    """``tokenizer.bpe`` with its memo cache kept bounded (it otherwise keeps every word ever seen)."""
    pieces = tokenizer.bpe(word)
    if len(tokenizer.cache) > BPE_CACHE_ENTRIES:
        specials = _special_texts(tokenizer)
        tokenizer.cache = {t: t for t in specials}
    return pieces


def _encode_with_offsets(caption: str, tokenizer: Tokenizer) -> list[tuple[int, int, int]]:
    """(id, start, end) for each BPE token of ``caption`` (without SOT/EOT), in order.

    This is ``tokenizer.encode`` (the same regex and BPE over the tokenizer's own cleaning), keeping
    offsets. Text that spells a special token (``<end_of_text>``, after cleaning) is refused: the
    tokenizer would turn it into that control token, which ends the caption for the model.
    """
    cleaned, spans = clean_with_spans(caption, tokenizer.clean_fn)
    specials = _special_texts(tokenizer)
    result: list[tuple[int, int, int]] = []
    for m in tokenizer.pat.finditer(cleaned):
        word = m.group()
        byte_word = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
        if byte_word in specials:
            start, end = spans[m.start()][0], spans[m.end() - 1][1]
            raise SpecialTokenText(caption[start:end], start, end)
        # BPE runs over UTF-8 bytes; remember which character of the word each byte belongs to.
        byte_char = [k for k, ch in enumerate(word) for _ in ch.encode("utf-8")]
        byte_pos = 0
        for piece in _bpe(tokenizer, byte_word).split(" "):
            n_bytes = len(piece[:-4] if piece.endswith("</w>") else piece)
            first = m.start() + byte_char[byte_pos]
            last = m.start() + byte_char[byte_pos + n_bytes - 1]
            result.append((tokenizer.encoder[piece], spans[first][0], spans[last][1]))
            byte_pos += n_bytes
    return result


def _tokenizer_of(loaded_or_tokenizer: object) -> object:
    """The tokenizer itself: ``loaded_or_tokenizer`` or, for a ``LoadedModel``, its ``tokenizer``."""
    from attribution.tokenizers import is_hf_tokenizer

    if is_hf_tokenizer(loaded_or_tokenizer):
        return loaded_or_tokenizer
    return getattr(loaded_or_tokenizer, "tokenizer", loaded_or_tokenizer)


def clip_bpe_tokenizer(tokenizer: object) -> Tokenizer:
    """``tokenizer`` as open_clip's CLIP BPE ``SimpleTokenizer``; ``UnsupportedModel`` if it is another."""
    needed = (
        "pat",
        "bpe",
        "encoder",
        "decoder",
        "byte_encoder",
        "clean_fn",
        "all_special_ids",
        "sot_token_id",
        "eot_token_id",
    )
    if not all(hasattr(tokenizer, a) for a in needed) or getattr(tokenizer, "reduction_fn", None):
        raise UnsupportedModel(
            f"tokenizer {type(tokenizer).__name__} is not open_clip's CLIP BPE tokenizer; "
            "token offsets are only available for CLIP models with the SimpleTokenizer"
        )
    return cast(Tokenizer, tokenizer)


def tokenize_caption(
    caption: str,
    loaded_or_tokenizer: object,
    *,
    context_length: int | None = None,
    truncate: bool = False,
    max_chars: int = MAX_CAPTION_CHARS,
) -> tuple[torch.Tensor, list[Token]]:
    """Token ids (``context_length``,) exactly as the model's tokenizer gives them, and the tokens.

    ``loaded_or_tokenizer`` is a ``LoadedModel`` or an open_clip ``SimpleTokenizer`` (CLIP's BPE) or
    ``HFTokenizer`` (Hugging Face tokenizers, see ``attribution.tokenizers``); ``context_length``
    defaults to the model's (or tokenizer's). Tokens run from SOT (span (0, 0)) to EOT (span
    (len, len)); padding is not listed. The caption is cleaned once (the tokenizer's own ``clean_fn``)
    and byte-pair encoded once. Raises ``CaptionTooManyCharacters`` for a caption over ``max_chars``
    characters (checked first: cleaning costs grow faster than the length), ``EmptyCaption`` for one
    without tokens, ``SpecialTokenText`` for one that spells a control token, and ``CaptionTooLong``
    when SOT + tokens + EOT exceed the context, unless ``truncate`` (then the tail is dropped as
    open_clip does, EOT kept last).
    """
    from attribution.tokenizers import is_hf_tokenizer, tokenize_hf

    found = _tokenizer_of(loaded_or_tokenizer)
    if context_length is None:
        context_length = int(
            getattr(loaded_or_tokenizer, "context_length", None) or cast(Any, found).context_length
        )
    if not isinstance(caption, str):
        raise CaptionError(f"caption must be a string, got {type(caption).__name__}")
    if len(caption) > max_chars:
        raise CaptionTooManyCharacters(len(caption), max_chars)
    if is_hf_tokenizer(found):  # the one dispatch point between tokenizer families
        return tokenize_hf(caption, cast("HFTokenizer", found), context_length, truncate)
    tokenizer = clip_bpe_tokenizer(found)
    body = _encode_with_offsets(caption, tokenizer)
    if not body:
        raise EmptyCaption("caption is empty or only whitespace; give at least one word")
    n_tokens = len(body) + 2
    if n_tokens > context_length:
        if not truncate:
            raise CaptionTooLong(n_tokens, context_length)
        body = body[: context_length - 2]

    end = len(caption)
    tokens = [Token(0, tokenizer.sot_token_id, SOT_TEXT, 0, 0)]
    for i, (tid, start, stop) in enumerate(body, start=1):
        text = caption[start:stop] or tokenizer.decode([tid]).strip()
        tokens.append(Token(i, tid, text, start, stop))
    tokens.append(Token(len(tokens), tokenizer.eot_token_id, EOT_TEXT, end, end))

    ids = torch.zeros(context_length, dtype=torch.long)  # open_clip pads with 0
    ids[: len(tokens)] = torch.tensor([t.id for t in tokens], dtype=torch.long)
    return ids, tokens
