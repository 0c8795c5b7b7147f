"""Hugging Face tokenizers (as open_clip wraps them in ``HFTokenizer``) with character offsets.

SigLIP's SentencePiece tokenizer, SigLIP 2's Gemma tokenizer and other Hugging Face tokenizers reach the
model through open_clip's ``HFTokenizer``: its ``clean_fn`` (often ``canonicalize``: lower-cased,
punctuation dropped) and then the Hugging Face tokenizer. Here both run once, exactly as open_clip calls
them, so the ids are the model's. Character offsets come from the tokenizer itself where it is a fast
(Rust) tokenizer (``offset_mapping``), else from aligning its pieces with the cleaned text; either way
they are mapped back through the cleaning to the original caption. Characters the cleaning drops belong
to no token.

``transformers`` is imported only when a Hugging Face tokenizer is loaded.
"""

from __future__ import annotations

import os
import string
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from attribution.errors import (
    CaptionTooLong,
    EmptyCaption,
    ModelNotAvailable,
    SpecialTokenText,
    UnsupportedModel,
)
from attribution.text import Spans, Token, clean_with_spans

# What a user provides when a model's Hugging Face tokenizer cannot be found.
TOKENIZER_HOW_TO = (
    "pass a local tokenizer directory (one a Hugging Face tokenizer's save_pretrained wrote) with "
    "--tokenizer /path/to/tokenizer (EXCLIP_TOKENIZER), or put the tokenizer in the Hugging Face cache"
)
# SentencePiece writes a word's leading space as this character.
_SPACE_MARK = "\u2581"


class HFTokenizer(Protocol):
    """What this module uses of open_clip's ``HFTokenizer``."""

    tokenizer: Any  # the transformers tokenizer (untyped library)
    clean_fn: Callable[[str], str]
    context_length: int
    tokenizer_mode: str
    strip_sep_token: bool

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor: ...


def is_hf_tokenizer(tokenizer: object) -> bool:
    """Whether ``tokenizer`` is open_clip's wrapper of a Hugging Face tokenizer."""
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    return isinstance(tokenizer, OpenClipHFTokenizer)


def hf_tokenizer_source(cfg: dict[str, Any]) -> str | None:
    """The Hugging Face tokenizer name an open_clip model config asks for, or None (CLIP's BPE)."""
    name = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    return str(name) if name else None


def load_hf_tokenizer(
    model: str, cfg: dict[str, Any], path: str | None = None, cache_dir: str | None = None
) -> HFTokenizer:
    """open_clip's ``HFTokenizer`` for ``model``, from the directory ``path`` or else the HF cache / hub.

    ``HF_HUB_OFFLINE`` is respected (the hub library reads it). Never substitutes another tokenizer:
    raises ``ModelNotAvailable`` naming the tokenizer and what to provide when it cannot be loaded.
    """
    name = hf_tokenizer_source(cfg)
    if name is None:
        raise UnsupportedModel(f"model {model!r} uses CLIP's built-in BPE tokenizer, not a Hugging Face one")
    if path is not None and not Path(path).is_dir():
        raise ModelNotAvailable(
            f"tokenizer directory {path!r} for model {model!r} does not exist; {TOKENIZER_HOW_TO}"
        )
    text_cfg = cfg.get("text_cfg", {})
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    try:
        tokenizer: HFTokenizer = OpenClipHFTokenizer(
            path or name,
            context_length=text_cfg.get("context_length", 77),
            cache_dir=cache_dir,
            **(text_cfg.get("tokenizer_kwargs") or {}),
        )
    except Exception as e:  # missing files, hub errors, offline mode: all mean "not available"
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        where = f"directory {path!r}" if path else f"Hugging Face tokenizer {name!r}{offline}"
        raise ModelNotAvailable(
            f"the tokenizer of model {model!r} could not be loaded from the {where}: "
            f"{type(e).__name__}: {' '.join(str(e).split())}; {TOKENIZER_HOW_TO}"
        ) from e
    return tokenizer


def _check_mode(tokenizer: HFTokenizer) -> None:
    if tokenizer.tokenizer_mode:
        raise UnsupportedModel(
            "token offsets are not available for open_clip's HFTokenizer with tokenizer_mode "
            f"{tokenizer.tokenizer_mode!r}; only its standard mode (strip_sep_token or not) is supported"
        )


def _fold(ch: str) -> str:
    """A character as SentencePiece's NFKC normaliser and a lower-casing tokenizer see it."""
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs"):  # format characters read as spaces
        return " "
    return unicodedata.normalize("NFKC", ch).lower()


def _fold_piece(piece: str) -> str:
    return "".join(_fold(ch) for ch in piece.replace(_SPACE_MARK, " ")).strip()


def _piece_offsets(cleaned: str, pieces: Sequence[str], unknown: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, end) in ``cleaned`` of each piece of a slow (SentencePiece) tokenizer, in order.

    Pieces are matched against the folded text (each character NFKC-normalised and lower-cased, which
    may make it several characters: a piece may then cover part of one, and both share its span); a
    leading ``▁`` is the space before a piece, punctuation the tokenizer itself dropped is skipped, and
    an unknown piece covers what lies before the next piece's match. One pass: positions only move on.
    """
    folded = [_fold(ch) for ch in cleaned]
    text = "".join(folded)
    source = [i for i, f in enumerate(folded) for _ in f]  # folded position -> cleaned character
    n = len(text)

    def skippable(pos: int, want: str) -> bool:
        ch = text[pos]
        return ch.isspace() or (bool(want) and ch in string.punctuation and not text.startswith(want, pos))

    spans: list[tuple[int, int]] = []  # in folded positions
    pos = 0
    pending = False  # the last piece was unknown and waits for its end
    for piece, unk in zip(pieces, unknown, strict=True):
        want = _fold_piece(piece)
        if pending:  # the unknown piece ends where this one (or, for a bare space piece, a space) is found
            while pos < n and (not text[pos].isspace() if not want else not text.startswith(want, pos)):
                pos += 1
            spans[-1] = (spans[-1][0], pos)
            pending = False
        while pos < n and skippable(pos, want):
            pos += 1
        if unk:
            spans.append((pos, pos))
            pos, pending = pos + 1, True  # an unknown piece covers at least one character
            continue
        if not text.startswith(want, pos):
            at = source[pos] if pos < n else len(cleaned)
            raise UnsupportedModel(
                f"the tokenizer's piece {piece!r} does not match the cleaned caption at character {at}; "
                "token offsets cannot be kept for this tokenizer"
            )
        spans.append((pos, pos + len(want)))
        pos += len(want)
    if pending:
        spans[-1] = (spans[-1][0], max(spans[-1][0] + 1, len(text.rstrip())))
    return [_to_cleaned(a, b, source, len(cleaned)) for a, b in spans]


def _to_cleaned(start: int, end: int, source: list[int], length: int) -> tuple[int, int]:
    """Folded positions [start, end) as cleaned characters (every character a position came from)."""
    if end <= start:
        at = source[start] if start < len(source) else length
        return at, at
    return source[start], source[min(end, len(source)) - 1] + 1


def _to_caption(start: int, end: int, cleaned: str, spans: Spans, length: int) -> tuple[int, int]:
    """The original caption's span of ``cleaned[start:end]``, surrounding whitespace left out."""
    while start < end and cleaned[start].isspace():
        start += 1
    while end > start and cleaned[end - 1].isspace():
        end -= 1
    if start == end:  # a piece of only whitespace covers no character
        at = spans[start][0] if start < len(spans) else length
        return at, at
    return spans[start][0], spans[end - 1][1]


def _body_offsets(hf: Any, cleaned: str, body: list[int], encoded: Any) -> list[tuple[int, int]]:
    if "offset_mapping" in encoded:  # fast tokenizers report them
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    pieces = hf.convert_ids_to_tokens(body)
    unknown = [i == hf.unk_token_id for i in body]
    return _piece_offsets(cleaned, pieces, unknown)


def tokenize_hf(
    caption: str, tokenizer: HFTokenizer, context_length: int, truncate: bool
) -> tuple[torch.Tensor, list[Token]]:
    """``tokenize_caption`` for an open_clip ``HFTokenizer``: ids exactly as it gives them, and the tokens.

    Tokens are the rows the attention mask keeps, in order (``index`` is the position in that list);
    template tokens (start/end) cover no characters: (0, 0) before the caption's words, (len, len) after.
    """
    _check_mode(tokenizer)
    hf = tokenizer.tokenizer
    cleaned, spans = clean_with_spans(caption, tokenizer.clean_fn)
    offsets_wanted = bool(getattr(hf, "is_fast", False))
    encoded = hf(cleaned, add_special_tokens=False, return_offsets_mapping=offsets_wanted)
    body: list[int] = list(encoded["input_ids"])
    if not body:
        raise EmptyCaption(
            "caption has no tokens once the model's tokenizer cleans it; give at least one word"
        )
    offsets = [
        _to_caption(a, b, cleaned, spans, len(caption)) for a, b in _body_offsets(hf, cleaned, body, encoded)
    ]
    specials = set(hf.all_special_ids) - {hf.unk_token_id}
    for tid, (start, end) in zip(body, offsets, strict=True):
        if tid in specials:
            raise SpecialTokenText(caption[start:end], start, end)
    n_tokens = len(body) + int(hf.num_special_tokens_to_add())
    if n_tokens > context_length and not truncate:
        raise CaptionTooLong(n_tokens, context_length)

    # open_clip's own call (HFTokenizer.__call__), on the text its clean_fn gave.
    full = hf(
        [cleaned], return_tensors="pt", max_length=context_length, padding="max_length", truncation=True
    )
    ids: torch.Tensor = full["input_ids"][0]
    kept = [int(i) for i in ids[full["attention_mask"][0].bool()]]
    if tokenizer.strip_sep_token:  # open_clip writes padding (0) over [SEP], as CLIPA was trained: no row
        sep = int(hf.sep_token_id)
        ids = torch.where(ids == sep, torch.zeros_like(ids), ids)
        kept = [k for k in kept if k != sep]
    n_body = min(len(body), len(kept) - (n_tokens - len(body)))
    first = next((k for k in range(len(kept) - n_body + 1) if kept[k : k + n_body] == body[:n_body]), None)
    if first is None:  # the words alone encode differently from the words in the template
        raise UnsupportedModel("the tokenizer encodes the caption differently with its start/end tokens")
    tokens: list[Token] = []
    for index, tid in enumerate(kept):
        if first <= index < first + n_body:
            start, end = offsets[index - first]
            text = caption[start:end] or str(hf.convert_ids_to_tokens(tid))
        else:
            start = end = 0 if index < first else len(caption)
            text = str(hf.convert_ids_to_tokens(tid))
        tokens.append(Token(index, tid, text, start, end))
    return ids, tokens
