"""The engine against the authors' reference implementation (exclip 1.1) and against the identity
it must satisfy. The reference is a test-only dependency, installed with ``pip install --no-deps``."""

from __future__ import annotations

import open_clip
import pytest
import torch
from exclip.explanation import OpenClipExplainer

from attribution.errors import CaptionTooLong, EmptyCaption, InvalidOption, UnsupportedModel
from attribution.explainer import Explainer, interpolation_points
from attribution.models import TINY_MODEL
from attribution.tail import dense_token_vjps, token_jvps
from testing import perturb_norms_and_biases

LAYERS = 3  # blocks per tower of the tiny model
IMAGE_SIZE = 32
WORDS = "dog cat red ball grass tree sky blue car road house window street person".split()


def tiny_model(seed: int) -> torch.nn.Module:
    """A random tiny CLIP whose norms and biases are not at their initial values (stricter test)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    perturb_norms_and_biases(model)
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


def test_batch_composition_does_not_change_results(models, tokenizer):
    """Each distinct input is computed on its own: a pair gives the same bits alone or in any batch."""
    model = models[0]
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    captions = [caption_of(3, 1), caption_of(20, 2), caption_of(7, 3)]
    pairs = [(i, c) for i in range(2) for c in captions]
    explainer = Explainer(model, tokenizer, 1, 2, 5)

    def run(order: list[tuple[int, str]]) -> list:
        return explainer.explain(torch.stack([images[i] for i, _ in order]), [c for _, c in order])

    batch, reordered = run(pairs), run(pairs[::-1])[::-1]
    for (i, caption), result, other in zip(pairs, batch, reordered, strict=True):
        single = explainer.explain(images[i : i + 1], [caption])[0]
        for r in (result, other):
            assert torch.equal(r.interactions, single.interactions)
            assert torch.equal(r.cls, single.cls)
            assert r.score == single.score
            assert r.completeness == single.completeness


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


# Max relative error against float32 measured on the 9 configurations below (2026-11-28, CPU): bfloat16
# 4.0e-3 … 1.4e-2, float16 4.6e-4 … 1.4e-3. Upper bounds: about twice the worst; lower bounds: a tenth
# of the best, so a precision that is silently not used fails too.
PRECISION_BOUNDS = {"bfloat16": (4e-4, 2.5e-2), "float16": (4e-5, 3e-3)}


@pytest.mark.parametrize("layers", [(1, 1), (2, 2), (0, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_precision_error_is_bounded_and_shows_in_completeness(models, tokenizer, seed, layers):
    model = models[seed]
    caption = caption_of(10, 3)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    full = Explainer(model, tokenizer, *layers, 10).explain(image, [caption])[0]
    errors = {}
    for precision, (low_bound, high_bound) in PRECISION_BOUNDS.items():
        low = Explainer(model, tokenizer, *layers, 10, precision=precision).explain(image, [caption])[0]
        assert low.interactions.dtype == torch.float32
        errors[precision] = relative_error(low.interactions, full.interactions)
        assert low_bound < errors[precision] < high_bound, precision
        assert relative_error(low.cls, full.cls) < 5 * high_bound  # the CLS column is smaller, noisier
        # Embeddings and the path's ends are float32 in every precision: the score and the value the
        # method explains do not move, and the completeness figures move exactly by the sum's error.
        assert low.score == full.score
        assert low.completeness.path_expected == full.completeness.path_expected
        assert low.completeness.expected == full.completeness.expected
        moved = low.completeness.total - full.completeness.total
        assert moved != 0
        assert low.completeness.integration_gap - full.completeness.integration_gap == pytest.approx(moved)
    assert errors["float16"] < errors["bfloat16"]  # 10 against 7 mantissa bits


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
    with pytest.raises(CaptionTooLong, match="92 tokens") as too_long:
        explainer.explain(image, [caption_of(90, 0)])  # SOT + 90 one-token words + EOT
    assert (too_long.value.n_tokens, too_long.value.limit) == (92, 77)
    with pytest.raises(EmptyCaption):
        explainer.explain(image, ["   "])
    with pytest.raises(InvalidOption, match="expected images"):
        explainer.explain(image, ["a dog", "a cat"])


def test_unsupported_architecture_is_refused(tokenizer):
    model = open_clip.create_model("RN50", pretrained=None).eval()
    with pytest.raises(UnsupportedModel, match="not an open_clip VisionTransformer"):
        Explainer(model, tokenizer, 0, 0)


def test_default_layers_are_the_last_blocks(models, tokenizer):
    explainer = Explainer(models[0], tokenizer)
    assert (explainer.text_layer, explainer.image_layer) == (LAYERS - 1, LAYERS - 1)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    default = explainer.explain(image, ["a red ball"])[0]
    explicit = Explainer(models[0], tokenizer, LAYERS - 1, LAYERS - 1).explain(image, ["a red ball"])[0]
    assert torch.equal(default.interactions, explicit.interactions)


@pytest.mark.parametrize("layer,max_tangents", [(0, 4096), (0, 250), (1, 250), (2, 4096), (2, 20)])
def test_forward_and_reverse_mode_agree_on_a_long_caption(models, tokenizer, layer, max_tangents):
    """The closed-form first block plus dense tangents (forward) against autograd (reverse), causal mask
    included; a small ``max_tangents`` splits points and tangent tokens into chunks (the last partial)."""
    model = models[2]
    text = Explainer(model, tokenizer).text
    tokens = tokenizer([caption_of(40, 5)])[:, :42]
    hidden = text.hidden(tokens, layer).float()
    reference = text.hidden(torch.zeros_like(tokens), layer).float()
    tail = text.tail(layer, torch.float32, torch.device("cpu"))
    points = torch.cat([reference + a * (hidden - reference) for a in (1.0, 0.5, 0.1)])
    delta = (hidden - reference).expand_as(points)
    pool = text.pool_index(tokens).expand(3)
    forward = token_jvps(tail, points, delta, pool, max_tangents)
    reverse = dense_token_vjps(tail, points, delta, pool, chunk=8)
    assert forward.shape == reverse.shape == (3, 42, model.text_projection.shape[1])
    assert relative_error(forward, reverse) <= 1e-5


def test_path_expected_from_open_clip(models, tokenizer):
    """``path_expected`` from open_clip alone: the text reference's tokens run through the whole text
    transformer and are pooled at the caption's EOT row, the image reference is the zero image."""
    model = models[1]
    caption = caption_of(7, 8)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(8))
    tokens = tokenizer([caption])
    eot = int(tokens.argmax())
    ref_tokens = torch.zeros_like(tokens)
    ref_tokens[0, 0], ref_tokens[0, 2] = tokenizer.sot_token_id, tokenizer.eot_token_id
    with torch.no_grad():
        t = model.encode_text(tokens)[0]
        x, rx = model.encode_image(torch.cat([image, torch.zeros_like(image)]))
        states = model.transformer(
            model.token_embedding(ref_tokens) + model.positional_embedding, attn_mask=model.attn_mask
        )
        path_start = model.ln_final(states[0, eot]) @ model.text_projection
    expected_path = float((t - path_start) @ (x - rx) / (t.norm() * x.norm()))
    for layers in [(0, 0), (1, 2), (2, 2)]:  # the path's ends do not depend on the cut
        result = Explainer(model, tokenizer, *layers, 8).explain(image, [caption])[0]
        assert result.completeness.path_expected == pytest.approx(expected_path, abs=1e-6, rel=1e-5)
    assert abs(expected_path - result.completeness.expected) > 1e-4  # the two conventions differ here


def test_reference_arange_gives_n_plus_one_points_at_49():
    """The documented difference: the reference's float ``arange(1, 0, -1/N)`` has N + 1 points for N = 49
    (its last one is almost 0, the reference itself), N for 7 and 100; the engine always has N."""

    def reference_points(n: int) -> torch.Tensor:
        return torch.arange(1, 0, -1 / n, dtype=torch.float32)

    assert [len(reference_points(n)) for n in (7, 49, 100)] == [7, 50, 100]
    assert float(reference_points(49)[-1]) < 1e-6
    assert [len(interpolation_points(n)) for n in (7, 49, 100)] == [7, 49, 100]


@pytest.mark.parametrize(
    "steps", [7, pytest.param(49, marks=pytest.mark.slow), pytest.param(100, marks=pytest.mark.slow)]
)
def test_same_explicit_points_as_the_reference(models, tokenizer, steps):
    model = models[0]
    caption = caption_of(5, steps)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(steps))
    points = interpolation_points(steps).float()
    expected = reference(model, tokenizer, image, caption, 1, 2, points)
    result = Explainer(model, tokenizer, 1, 2, points=points).explain(image, [caption])[0]
    assert relative_error(result.interactions, expected) <= 1e-5
    if steps == 49:  # the reference's own N = 49 is the engine given its 50 points, not the engine's 49
        own = reference(model, tokenizer, image, caption, 1, 2, 49)
        fifty = torch.arange(1, 0, -1 / 49, dtype=torch.float32)
        with_fifty = Explainer(model, tokenizer, 1, 2, points=fifty).explain(image, [caption])[0]
        assert relative_error(with_fifty.interactions, own) <= 1e-5
        assert relative_error(result.interactions, own) > 1e-3
