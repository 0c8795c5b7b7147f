"""The engine against the authors' reference implementation (exclip 1.1) and against the identity
it must satisfy. The reference is a test-only dependency, installed with ``pip install --no-deps``."""

from __future__ import annotations

import open_clip
import pytest
import torch
from exclip.explanation import OpenClipExplainer

from attribution.errors import CaptionTooLong, EmptyCaption, InvalidOption, UnsupportedModel
from attribution.explainer import Explainer
from attribution.models import TINY_MODEL

LAYERS = 3  # blocks per tower of the tiny model
IMAGE_SIZE = 32
WORDS = "dog cat red ball grass tree sky blue car road house window street person".split()


def tiny_model(seed: int) -> torch.nn.Module:
    """A random tiny CLIP whose norms and biases are not at their initial values (stricter test)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("ln" in name or "bias" in name):
                param.add_(0.1 * torch.randn_like(param))
    return model


def caption_of(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n_words,), generator=g))


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def models():
    return {seed: tiny_model(seed) for seed in (0, 1, 2)}


def reference(model, tokenizer, image, caption, text_layer, image_layer, steps) -> torch.Tensor:
    ref = OpenClipExplainer(model, image_dim=IMAGE_SIZE, device=torch.device("cpu"))
    try:
        return ref.explain(
            tokenizer([caption]), image, text_layer=text_layer, image_layer=image_layer, N=steps
        )
    finally:
        ref.reset_attribution()  # the reference leaves its hooks on the model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("image_layer", range(LAYERS))
@pytest.mark.parametrize("text_layer", range(LAYERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_every_layer(models, tokenizer, seed, text_layer, image_layer, steps):
    model = models[seed]
    # Caption lengths 1 … 68 words cover both the forward (few tokens) and reverse (many tokens) modes.
    n_words = [1, 4, 12, 30, 68][(seed * 9 + text_layer * 3 + image_layer) % 5]
    caption = caption_of(n_words, seed)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    expected = reference(model, tokenizer, image, caption, text_layer, image_layer, steps)
    result = Explainer(model, tokenizer, text_layer, image_layer, steps).explain(image, [caption])[0]
    assert result.interactions.dtype == torch.float32
    assert result.interactions.shape == expected.shape == (n_words + 2, 4, 4)
    assert relative_error(result.interactions, expected) <= 1e-4


@pytest.mark.parametrize("n_words", [1, 2, 8, 33, 50, 68])
def test_matches_reference_caption_lengths(models, tokenizer, n_words):
    model = models[1]
    caption = caption_of(n_words, n_words)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(n_words))
    expected = reference(model, tokenizer, image, caption, LAYERS - 1, LAYERS - 1, 10)
    result = Explainer(model, tokenizer, LAYERS - 1, LAYERS - 1, 10).explain(image, [caption])[0]
    assert result.interactions.shape[0] == n_words + 2
    assert relative_error(result.interactions, expected) <= 1e-4


def test_batched_pairs_equal_single_pairs(models, tokenizer):
    model = models[0]
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    captions = [caption_of(3, 1), caption_of(20, 2), caption_of(7, 3)]
    pairs = [(i, c) for i in range(2) for c in captions]
    explainer = Explainer(model, tokenizer, 1, 2, 5)
    batch = explainer.explain(torch.stack([images[i] for i, _ in pairs]), [c for _, c in pairs])
    for (i, caption), result in zip(pairs, batch, strict=True):
        single = explainer.explain(images[i : i + 1], [caption])[0]
        assert result.interactions.shape == single.interactions.shape
        assert relative_error(result.interactions, single.interactions) <= 1e-5
        assert result.score == pytest.approx(single.score, abs=1e-6)


def test_score_and_completeness_identity(models, tokenizer):
    """``expected`` is (h(t)−h(r_t))·(g(x)−g(r_x)) / (‖h(t)‖‖g(x)‖), computed here with open_clip itself."""
    model = models[2]
    caption = caption_of(6, 4)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    result = Explainer(model, tokenizer, LAYERS - 1, LAYERS - 1, 10).explain(image, [caption])[0]

    ref_tokens = torch.zeros(1, 77, dtype=torch.long)
    ref_tokens[0, 0], ref_tokens[0, 2] = tokenizer.sot_token_id, tokenizer.eot_token_id
    with torch.no_grad():
        t, rt = model.encode_text(torch.cat([tokenizer([caption]), ref_tokens]))
        x, rx = model.encode_image(torch.cat([image, torch.zeros_like(image)]))
    norm = t.norm() * x.norm()
    assert result.score == pytest.approx(float(t @ x / norm), abs=1e-5)
    assert result.completeness.expected == pytest.approx(float((t - rt) @ (x - rx) / norm), abs=1e-5)
    total = float(result.interactions.sum() + result.cls.sum())
    assert result.completeness.total == pytest.approx(total, abs=1e-5)
    assert result.completeness.gap == pytest.approx(result.completeness.total - result.completeness.expected)


@pytest.mark.parametrize("seed,text_layer,image_layer", [(0, 2, 2), (1, 2, 2), (0, 0, 1)])
def test_integration_gap_shrinks_with_steps(models, tokenizer, seed, text_layer, image_layer):
    model = models[seed]
    caption = caption_of(9, 7)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    runs = [
        Explainer(model, tokenizer, text_layer, image_layer, n).explain(image, [caption])[0]
        for n in (4, 16, 64, 256)
    ]
    gaps = [abs(r.completeness.integration_gap) for r in runs]
    # A right Riemann sum: the error falls as 1/N (it may cross zero on the way, so compare far apart).
    assert gaps[2] < gaps[1] / 3
    assert gaps[2] < gaps[0] / 4
    # The total gap tends to the constant the reference's EOT-pooling convention leaves.
    offset = runs[-1].completeness.path_expected - runs[-1].completeness.expected
    assert runs[-1].completeness.gap == pytest.approx(offset, abs=2 * gaps[2] + 1e-6)


def test_gap_of_one_word_caption_shrinks_to_zero(models, tokenizer):
    """With EOT at position 2, as in the reference caption, both paths coincide and the gap vanishes."""
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    runs = [Explainer(models[0], tokenizer, 2, 2, n).explain(image, ["dog"])[0] for n in (2, 8, 32, 128)]
    gaps = [abs(r.completeness.gap) for r in runs]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert runs[-1].completeness.path_expected == pytest.approx(runs[-1].completeness.expected, abs=1e-6)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_is_close_and_reports_its_gap(models, tokenizer, precision):
    model = models[1]
    caption = caption_of(10, 3)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    full = Explainer(model, tokenizer, 1, 1, 10).explain(image, [caption])[0]
    low = Explainer(model, tokenizer, 1, 1, 10, precision=precision).explain(image, [caption])[0]
    assert low.interactions.dtype == torch.float32
    assert torch.isfinite(low.interactions).all()
    assert relative_error(low.interactions, full.interactions) < 0.1
    assert low.completeness.gap != full.completeness.gap


def test_bad_options_are_specific_errors(models, tokenizer):
    model = models[0]
    with pytest.raises(InvalidOption, match="text_layer must be an integer block index from 0 to 2"):
        Explainer(model, tokenizer, text_layer=3, image_layer=0)
    with pytest.raises(InvalidOption, match="image_layer"):
        Explainer(model, tokenizer, text_layer=0, image_layer=-1)
    with pytest.raises(InvalidOption, match="steps must be an integer ≥ 1"):
        Explainer(model, tokenizer, 0, 0, steps=0)
    with pytest.raises(InvalidOption, match="precision must be one of float32, bfloat16, float16"):
        Explainer(model, tokenizer, 0, 0, precision="int8")
    explainer = Explainer(model, tokenizer, 0, 0, 1)
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(CaptionTooLong, match="76 tokens .* context length is 77|tokens"):
        explainer.explain(image, [caption_of(90, 0)])
    with pytest.raises(EmptyCaption):
        explainer.explain(image, ["   "])
    with pytest.raises(InvalidOption, match="expected images"):
        explainer.explain(image, ["a dog", "a cat"])


def test_unsupported_architecture_is_refused(tokenizer):
    model = open_clip.create_model("RN50", pretrained=None).eval()
    with pytest.raises(UnsupportedModel, match="not an open_clip VisionTransformer"):
        Explainer(model, tokenizer, 0, 0)
