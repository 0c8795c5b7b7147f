"""The "aligned" text reference: its path ends at the reference's own embedding, so the interactions sum
to the score change they explain (``expected``), where the authors' convention sums to ``path_expected``.

Checked on CLIP (argmax pooling, CLIP's BPE) and on MetaCLIP 2 (EOS pooling, a Hugging Face tokenizer),
tiny random models; for a non-causal tower (SigLIP) both conventions are one and the same reference.
"""

from __future__ import annotations

import pytest
import torch

from attribution.errors import InvalidOption
from attribution.explainer import ALIGNED_REFERENCE, AUTHORS_REFERENCE, Explainer
from testing.families import build_family

CAPTION = "a red car near a tree"


def _explain(family: str, reference: str, steps: int, caption: str = CAPTION):
    model, tokenizer = build_family(family, seed=3)
    explainer = Explainer(model, tokenizer, 1, 1, steps, text_reference=reference)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))  # the families' size
    [result] = explainer.explain(image, [caption])
    return result


@pytest.mark.parametrize("family", ["clip", "metaclip2"])
def test_aligned_reference_path_ends_at_the_references_embedding(family: str) -> None:
    aligned = _explain(family, ALIGNED_REFERENCE, 2).completeness
    authors = _explain(family, AUTHORS_REFERENCE, 2).completeness
    assert aligned.path_expected == pytest.approx(aligned.expected, abs=1e-6)
    # the authors' path does not end there for a caption of several words: the gap this option removes
    assert abs(authors.path_expected - authors.expected) > 1e-3
    assert aligned.expected != pytest.approx(
        authors.expected, abs=1e-6
    )  # another reference, another score change


@pytest.mark.parametrize("family", ["clip", "metaclip2"])
def test_aligned_interactions_converge_to_the_score_change(family: str) -> None:
    """The gap is the Riemann sum's error alone (it falls like 1/N); the authors' tends to a constant."""
    gaps = [abs(_explain(family, ALIGNED_REFERENCE, n).completeness.gap) for n in (2, 8, 32)]
    assert gaps[2] < gaps[1] < gaps[0]
    assert gaps[2] < 0.3 * gaps[0]
    assert abs(_explain(family, AUTHORS_REFERENCE, 32).completeness.gap) > 3 * gaps[2]


def test_the_conventions_agree_where_the_caption_is_one_word() -> None:
    """[SOT, word, EOT]: the authors' reference already has its EOT on the caption's end row (the same
    ids; its hidden states are computed over the whole context there, so equal to rounding)."""
    a, b = (_explain("clip", r, 3, caption="car") for r in (AUTHORS_REFERENCE, ALIGNED_REFERENCE))
    assert torch.allclose(a.entries(), b.entries(), rtol=0, atol=1e-7)


def test_a_non_causal_tower_has_one_reference() -> None:
    a, b = (_explain("siglip", r, 2, caption="a red car") for r in (AUTHORS_REFERENCE, ALIGNED_REFERENCE))
    assert torch.equal(a.entries(), b.entries())


def test_an_unknown_convention_is_refused() -> None:
    model, tokenizer = build_family("clip")
    with pytest.raises(InvalidOption, match="text_reference must be one of authors, aligned"):
        Explainer(model, tokenizer, text_reference="own")
