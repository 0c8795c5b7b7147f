"""Hugging Face tokenizers (SigLIP's SentencePiece, SigLIP 2's Gemma-style) with character offsets, offline.

The tokenizers are built here: a SentencePiece model trained on a few sentences and saved as a
``SiglipTokenizer`` (a slow tokenizer: offsets come from aligning its pieces), and a ``Siglip2Tokenizer``
built in memory (a fast tokenizer: offsets from ``offset_mapping``). Both load through open_clip's
``HFTokenizer(dir)`` with ``HF_HUB_OFFLINE=1``, and every id is compared with open_clip's own call.
"""

from __future__ import annotations

import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import HFTokenizer

from attribution.errors import (
    EmptyCaption,
    InvalidOption,
    InvalidSelection,
    ModelNotAvailable,
    SpecialTokenText,
)
from attribution.models import TINY_MODEL, load_model, unsupported_reason
from attribution.selections import Span, selected_tokens
from attribution.text import Token, tokenize_caption
from attribution.tokenizers import TOKENIZER_HOW_TO, load_hf_tokenizer
from testing.families import save_gemma_tokenizer, save_siglip_tokenizer

sentencepiece = pytest.importorskip("sentencepiece", reason="the test extra installs sentencepiece")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

CONTEXT = 128  # room for every caption the property tests draw (SentencePiece splits into letters)
CAPTION_ALPHABET = "abcdefghijklmnopqrstuvwxyz" + "ACZ" + "   " + ",.!?_-'" + "éß"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece model trained here, saved as a SiglipTokenizer directory."""
    directory = tmp_path_factory.mktemp("siglip-tokenizer")
    save_siglip_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Gemma-style Siglip2Tokenizer built in memory, saved as a directory; letters only, no merges (the
    span tests below select single letters)."""
    directory = tmp_path_factory.mktemp("gemma-tokenizer")
    save_gemma_tokenizer(directory, words=())
    return directory


@pytest.fixture(scope="module", params=["siglip", "gemma"])
def hf_tokenizer(request: pytest.FixtureRequest, siglip_dir: Path, gemma_dir: Path) -> Iterator[HFTokenizer]:
    directory = siglip_dir if request.param == "siglip" else gemma_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = HFTokenizer(str(directory), context_length=CONTEXT, clean="canonicalize")
    yield tokenizer


def _covered(tokens: list[Token]) -> set[int]:
    return {i for t in tokens for i in range(t.start, t.end)}


def _kept_by_canonicalize(caption: str) -> set[int]:
    """Characters open_clip's canonicalize keeps as text: not whitespace, ASCII punctuation or ``_``."""
    return {i for i, ch in enumerate(caption) if not ch.isspace() and ch not in string.punctuation}


def _piece_text(tokenizer: HFTokenizer, token_id: int) -> str:
    return str(tokenizer.tokenizer.convert_ids_to_tokens(token_id)).replace("▁", "").strip()


def test_slow_and_fast_tokenizers_are_what_the_fixtures_claim(hf_tokenizer: HFTokenizer) -> None:
    is_fast = bool(getattr(hf_tokenizer.tokenizer, "is_fast", False))
    assert is_fast == isinstance(hf_tokenizer.tokenizer, transformers.Siglip2Tokenizer)


def test_ids_equal_open_clip_and_spans_cover_the_words(hf_tokenizer: HFTokenizer) -> None:
    caption = "A photo, of  a Cat!"
    ids, tokens = tokenize_caption(caption, hf_tokenizer)
    assert torch.equal(ids, hf_tokenizer(caption)[0])
    unpadded = hf_tokenizer.tokenizer(hf_tokenizer.clean_fn(caption))["input_ids"]  # SigLIP pads with EOS
    assert [t.id for t in tokens] == unpadded
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert _covered(tokens) == _kept_by_canonicalize(caption)
    words = "".join(caption[t.start : t.end] for t in tokens)
    assert words == "AphotoofaCat"  # original case kept, punctuation and spaces covered by no token
    if hf_tokenizer.tokenizer.eos_token_id in ids.tolist() and isinstance(
        hf_tokenizer.tokenizer, transformers.SiglipTokenizer
    ):
        assert (tokens[-1].start, tokens[-1].end) == (len(caption), len(caption))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caption=st.text(alphabet=CAPTION_ALPHABET, max_size=40))
def test_spans_are_consistent_with_tokens(hf_tokenizer: HFTokenizer, caption: str) -> None:
    if not hf_tokenizer.clean_fn(caption):
        with pytest.raises(EmptyCaption):
            tokenize_caption(caption, hf_tokenizer)
        return
    ids, tokens = tokenize_caption(caption, hf_tokenizer)
    assert torch.equal(ids, hf_tokenizer(caption)[0])
    kept = _kept_by_canonicalize(caption)
    assert kept <= _covered(tokens)  # a dropped character is covered only inside a token ("c,at" -> "cat")
    previous_end = 0
    unk = hf_tokenizer.tokenizer.unk_token_id
    for token in tokens:
        assert 0 <= token.start <= token.end <= len(caption)
        assert token.start >= previous_end  # ordered, disjoint
        previous_end = token.end
        if token.end > token.start:
            seen = hf_tokenizer.clean_fn(caption[token.start : token.end]).replace(" ", "")
            assert {token.start, token.end - 1} <= kept  # it starts and ends on kept characters
            if token.id != unk:
                assert seen == _piece_text(hf_tokenizer, int(token.id or 0))


UNUSUAL = [
    "&amp;",
    "&lt;",
    "&#65;",
    "\ufb01",
    "\u0130",
    "\u200b",
    "\u00bd",
    "\u201c",
    "\u00c3\u00a9",
    "<",
    "\t",
    "\n",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(UNUSUAL) | st.text(alphabet=CAPTION_ALPHABET, max_size=3), max_size=15))
def test_unusual_characters_keep_ids_and_ordered_spans(hf_tokenizer: HFTokenizer, parts: list[str]) -> None:
    """Entities, ligatures, dotted capitals, zero-width spaces, mojibake: the cleaning and normalisation
    change them; ids stay open_clip's and spans stay ordered, inside the caption, on non-space text."""
    caption = "".join(parts)
    cleaned = hf_tokenizer.clean_fn(caption)
    if not hf_tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"]:  # e.g. only "\u200b"
        with pytest.raises(EmptyCaption):
            tokenize_caption(caption, hf_tokenizer)
        return
    ids, tokens = tokenize_caption(caption, hf_tokenizer)
    assert torch.equal(ids, hf_tokenizer(caption)[0])
    for before, after in zip(tokens, tokens[1:], strict=False):
        assert before.start <= after.start and before.end <= after.end  # a split character is shared
    for token in tokens:
        assert 0 <= token.start <= token.end <= len(caption)
        if token.end > token.start:
            assert not caption[token.start].isspace() and not caption[token.end - 1].isspace()


def test_span_over_dropped_characters_is_a_clear_error(hf_tokenizer: HFTokenizer) -> None:
    caption = "a cat, a dog!"
    _, tokens = tokenize_caption(caption, hf_tokenizer)
    comma = caption.index(",")
    with pytest.raises(InvalidSelection, match="characters the model's tokenizer drops"):
        selected_tokens(tokens, Span(comma, comma + 1))
    picked = selected_tokens(tokens, Span(comma - 1, comma + 1))  # "t," selects the token of "t" only
    assert [caption[tokens[i].start : tokens[i].end] for i in picked] == ["t"]


def test_siglip_tokenizer_dropping_punctuation_itself_keeps_offsets(siglip_dir: Path) -> None:
    tokenizer = HFTokenizer(str(siglip_dir), context_length=CONTEXT, clean="whitespace")
    caption = "A cat, two dogs!"
    ids, tokens = tokenize_caption(caption, tokenizer)
    assert torch.equal(ids, tokenizer(caption)[0])
    assert _covered(tokens) == _kept_by_canonicalize(caption)


def test_control_token_text_is_refused(gemma_dir: Path) -> None:
    tokenizer = HFTokenizer(str(gemma_dir), context_length=CONTEXT, clean="whitespace")
    caption = "a cat <eos> a dog"
    with pytest.raises(SpecialTokenText) as caught:
        tokenize_caption(caption, tokenizer)
    assert (caught.value.start, caught.value.end) == (6, 11)


def test_clip_bpe_tokenizer_with_canonicalize_keeps_offsets() -> None:
    tokenizer = open_clip.SimpleTokenizer(context_length=32, clean="canonicalize")
    caption = "A Dog, on_the grass!"
    ids, tokens = tokenize_caption(caption, tokenizer)
    assert torch.equal(ids, tokenizer(caption)[0])
    assert _covered(tokens) == _kept_by_canonicalize(caption)


def test_missing_tokenizer_names_what_to_provide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    with pytest.raises(ModelNotAvailable) as caught:
        load_hf_tokenizer("ViT-B-16-SigLIP", cfg, None, cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "timm/ViT-B-16-SigLIP" in message and "HF_HUB_OFFLINE" in message and TOKENIZER_HOW_TO in message
    with pytest.raises(ModelNotAvailable, match="does not exist.*--tokenizer"):
        load_hf_tokenizer("ViT-B-16-SigLIP", cfg, str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotAvailable, match="could not be loaded from the directory.*--tokenizer"):
        load_hf_tokenizer("ViT-B-16-SigLIP", cfg, str(tmp_path))  # exists, holds no tokenizer


def test_local_directory_loads_the_models_tokenizer(siglip_dir: Path) -> None:
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    tokenizer = load_hf_tokenizer("ViT-B-16-SigLIP", cfg, str(siglip_dir))
    assert tokenizer.context_length == cfg["text_cfg"]["context_length"]
    assert tokenizer.clean_fn("A Cat!") == "a cat"  # the config's canonicalize cleaning
    ids, _ = tokenize_caption("a photo of a cat", tokenizer)
    assert ids.shape == (cfg["text_cfg"]["context_length"],)


def test_argmax_pooling_with_a_hugging_face_tokenizer_is_refused() -> None:
    reason = unsupported_reason({"vision_cfg": {}, "text_cfg": {"hf_tokenizer_name": "some/tokenizer"}})
    assert reason and "pools on the highest token id" in reason


def test_tokenizer_for_a_clip_bpe_model_is_refused(siglip_dir: Path) -> None:
    with pytest.raises(InvalidOption, match="CLIP's BPE tokenizer"):
        load_model(TINY_MODEL, None, tokenizer=str(siglip_dir))


def test_library_works_without_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import open_clip\n"
        "from attribution.text import tokenize_caption\n"
        "import attribution.models, attribution.pipeline, attribution.tokenizers\n"
        "ids, tokens = tokenize_caption('a dog', open_clip.get_tokenizer('exclip-tiny'))\n"
        "assert [t.text for t in tokens][1:-1] == ['a', 'dog'], tokens\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
