"""Contraction through the image embedding: A = Tᵀ I computed as the text factor's columns pulled back
through the image tower by reverse mode, never forming I. Same exactness as the factor route: the
authors' reference for the Riemann rule, the slow autograd oracle for the others."""

from __future__ import annotations

import open_clip
import pytest
import torch
from exclip.explanation import OpenClipExplainer

from attribution.explainer import REVERSE_PASS_COST, Explainer, contracts
from attribution.models import TINY_MODEL
from attribution.quadrature import GAUSS_LEGENDRE, MIDPOINT, RULES, quadrature_rule
from testing import perturb_norms_and_biases
from tests.attribution.test_quadrature import engine_matrix, relative_error, slow_explanation

IMAGE_SIZE = 32
CAPTIONS = ["dog", "a red ball on green grass", "two cats sleeping on a blue car in the street"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    perturb_norms_and_biases(model)
    return model, open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(21))


@pytest.mark.parametrize("layers", [(0, 0), (1, 1), (2, 0), (0, 2)])
def test_contraction_equals_the_reference(tiny, image, layers):
    model, tokenizer = tiny
    explainer = Explainer(model, tokenizer, *layers, 4, contraction=True)
    results = explainer.explain(image.expand(len(CAPTIONS), -1, -1, -1), CAPTIONS)
    for caption, result in zip(CAPTIONS, results, strict=True):
        ref = OpenClipExplainer(model, image_dim=IMAGE_SIZE, device=torch.device("cpu"))
        try:
            expected = ref.explain(
                tokenizer([caption]), image, text_layer=layers[0], image_layer=layers[1], N=4
            )
        finally:
            ref.reset_attribution()
        assert relative_error(result.interactions, expected) <= 1e-4


@pytest.mark.parametrize("name", RULES)
def test_contraction_equals_the_factor_route_for_every_rule(tiny, image, name):
    model, tokenizer = tiny
    n = 3
    images = image.expand(len(CAPTIONS), -1, -1, -1)
    routes = [
        Explainer(model, tokenizer, 1, 0, n, quadrature=name, contraction=flag).explain(images, CAPTIONS)
        for flag in (True, False)
    ]
    assert not all(torch.equal(a.interactions, b.interactions) for a, b in zip(*routes, strict=True))
    for contracted, factored in zip(*routes, strict=True):
        assert relative_error(engine_matrix(contracted), engine_matrix(factored)) <= 1e-5
        completeness = contracted.completeness
        assert completeness.total == pytest.approx(factored.completeness.total, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", [MIDPOINT, GAUSS_LEGENDRE])
def test_contraction_equals_the_slow_oracle(tiny, image, name):
    model, tokenizer = tiny
    rule = quadrature_rule(name, 3)
    expected = slow_explanation(model, tokenizer, image, CAPTIONS[1], (1, 1), rule)
    result = Explainer(model, tokenizer, 1, 1, 3, quadrature=name, contraction=True).explain(
        image, CAPTIONS[1:2]
    )
    assert relative_error(engine_matrix(result[0]), expected) <= 1e-4


def test_contraction_is_chosen_by_the_passes_each_way():
    assert contracts(True, 16, 197, 512)  # ViT-B-16, a 16-token caption: 16 reverse passes, not 197
    assert not contracts(True, 4 * 16, 50, 512)  # four such captions on one ViT-B-32 image: 50 tangents
    assert not contracts(False, 3, 197, 512)  # the last block: a forward tangent is one row there
    assert not contracts(True, 60, 50, 512)  # a long caption on ViT-B-32: its 50 tangents are fewer
    assert not contracts(True, 40, 197, 32)  # a small embedding: 32 reverse passes by axis
    limit = min(197, 512) / REVERSE_PASS_COST
    assert contracts(True, int(limit) - 1, 197, 512) and not contracts(True, int(limit) + 1, 197, 512)


def test_automatic_choice_counts_all_captions_of_an_image(tiny, image):
    """Decided per image by its captions' rows together: one short caption is contracted, the same
    caption beside two long ones on the same image is not; the results agree to rounding."""
    model, tokenizer = tiny
    explainer = Explainer(model, tokenizer, 1, 0, 3)
    together = explainer.explain(image.expand(len(CAPTIONS), -1, -1, -1), CAPTIONS)
    factored = Explainer(model, tokenizer, 1, 0, 3, contraction=False).explain(image, CAPTIONS[:1])[0]
    contracted = Explainer(model, tokenizer, 1, 0, 3, contraction=True).explain(image, CAPTIONS[:1])[0]
    alone = explainer.explain(image, CAPTIONS[:1])[0]
    assert torch.equal(alone.interactions, contracted.interactions)  # 3 rows < 17 image tokens
    assert torch.equal(together[0].interactions, factored.interactions)  # 3 + 8 + 12 rows ≥ 17
    assert relative_error(together[0].interactions, alone.interactions) <= 1e-5


@pytest.mark.parametrize("max_tangents", [20, 100])
def test_contraction_in_small_passes_is_the_same(tiny, image, max_tangents):
    """A small ``max_tangents`` splits the reverse passes by points and by cotangents."""
    model, tokenizer = tiny
    whole = Explainer(model, tokenizer, 0, 0, 5, contraction=True).explain(image, CAPTIONS[2:])[0]
    split = Explainer(model, tokenizer, 0, 0, 5, contraction=True, max_tangents=max_tangents)
    assert relative_error(split.explain(image, CAPTIONS[2:])[0].interactions, whole.interactions) <= 1e-6
