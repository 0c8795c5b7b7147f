"""Every grounding method on the random-weight tiny model: shapes, finiteness, and first-order sanity."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attribution.evaluation.grounding.methods import METHODS, Batch, MethodOptions, create_method
from attribution.evaluation.grounding.methods.integrated_gradients import integrated_gradients
from attribution.evaluation.grounding.methods.similarity import ImageSimilarity
from attribution.evaluation.grounding.samples import GroundingSample, Phrase
from attribution.pipeline import ExplainRequest, explain_requests
from attribution.selections import Span


def striped(colour: tuple[int, int, int], size=(48, 40)) -> Image.Image:
    image = Image.new("RGB", size, (90, 90, 90))
    for x in range(0, size[0], 6):
        image.paste(colour, (x, 0, x + 3, size[1]))
    return image


@pytest.fixture(scope="module")
def batch(tiny_model) -> Batch:
    samples = [
        GroundingSample(
            "a",
            striped((200, 30, 30)),
            "a red ball and a blue box",
            (Phrase((2, 10), ((0, 0, 20, 20),), "2"), Phrase((17, 25), ((20, 10, 48, 40),), "2")),
        ),
        GroundingSample(
            "b", striped((30, 30, 200)), "a green square", (Phrase((2, 14), ((5, 5, 30, 30),), "1"),)
        ),
    ]
    return Batch.build(tiny_model, samples)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_gives_one_finite_grid_map_per_phrase(tiny_model, batch, name):
    method = create_method(name, MethodOptions(steps=3))
    maps = method.heatmaps(tiny_model, batch, 1, 1)
    assert [len(m) for m in maps] == [2, 1]
    for per_sample in maps:
        for heatmap in per_sample:
            assert tuple(heatmap.shape) == tiny_model.grid
            assert heatmap.dtype == torch.float32
            assert torch.isfinite(heatmap).all()
    if name != "random":
        assert any(float(h.abs().max()) > 0 for m in maps for h in m)


def test_phrase_and_caption_interactions_are_rows_of_the_engine_matrix(tiny_model, batch):
    (explained,), _ = explain_requests(
        tiny_model,
        [
            ExplainRequest(batch.images[0], [batch.samples[0].caption], [[Span(2, 10)]]),
            ExplainRequest(batch.images[1], ["x"]),
        ],
        text_layer=0,
        image_layer=2,
        steps=3,
    )
    phrase = create_method("interactions", MethodOptions(steps=3)).heatmaps(tiny_model, batch, 0, 2)
    caption = create_method("interactions-caption", MethodOptions(steps=3)).heatmaps(tiny_model, batch, 0, 2)
    torch.testing.assert_close(phrase[0][0], explained.selections[0].heatmap)
    torch.testing.assert_close(caption[0][0], explained.result.interactions.sum(0))
    torch.testing.assert_close(caption[0][1], caption[0][0])  # one caption map for every phrase
    assert not torch.allclose(phrase[0][0], phrase[0][1])  # different tokens, different maps


def test_random_patch_is_one_hot_and_fixed_per_sample_and_seed(tiny_model, batch):
    first = create_method("random", MethodOptions(seed=5)).heatmaps(tiny_model, batch, 0, 0)
    again = create_method("random", MethodOptions(seed=5)).heatmaps(
        tiny_model,
        Batch(batch.samples[::-1], batch.images[::-1], batch.tensors.flip(0), batch.geometries[::-1]),
        0,
        0,
    )
    for heatmap in (h for m in first for h in m):
        assert heatmap.sum() == 1 and heatmap.max() == 1
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[1], strict=True))  # order does not matter
    seeds = [
        create_method("random", MethodOptions(seed=s)).heatmaps(tiny_model, batch, 0, 0)[0][0]
        for s in range(6)
    ]
    assert len({int(h.argmax()) for h in seeds}) > 1


@pytest.mark.parametrize("layer", [0, 2])
def test_similarity_at_the_cut_is_the_models_cosine_and_its_gradient_is_right(tiny_model, batch, layer):
    sim = ImageSimilarity(tiny_model, layer)
    texts = sim.text_embeddings(["a red ball", "a blue box"])
    hidden = sim.hidden(batch.tensors)
    with torch.no_grad():
        image = tiny_model.model.encode_image(batch.tensors)
    expected = texts @ (image / image.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(sim.similarity(hidden, texts), expected, atol=1e-5, rtol=1e-4)
    # The directional derivative by central differences.
    grads = sim.gradients(hidden, texts)  # (K, B, S, W)
    direction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    diff = sim.similarity(hidden + eps * direction, texts) - sim.similarity(hidden - eps * direction, texts)
    numeric = diff / (2 * eps)
    analytic = (grads * direction).sum(dim=(-1, -2))
    torch.testing.assert_close(analytic, numeric, atol=2e-3, rtol=2e-2)


def test_integrated_gradients_add_up_to_the_similarity_difference(tiny_model, batch):
    """Completeness: Σ attributions → cos(t, x) − cos(t, r) as the Riemann sum refines."""
    sim = ImageSimilarity(tiny_model, 1)
    texts = sim.text_embeddings(["a red ball", "a blue box"])
    hidden = sim.hidden(batch.tensors)[0]
    reference = sim.reference(tuple(batch.tensors.shape[-2:]))
    ends = sim.similarity(torch.stack([hidden, reference]), texts)
    target = ends[:, 0] - ends[:, 1]
    errors = {
        n: (integrated_gradients(sim, hidden, reference, texts, n).sum(-1) - target).abs().max()
        for n in (2, 8, 64)
    }
    # A right-endpoint Riemann sum errs by O(1/N): the error at N = 64 is about 1/8 of that at 8.
    assert errors[64] < 0.01 * float(target.abs().max()) + 1e-5
    assert errors[64] <= errors[8] / 4 + 1e-6
    assert errors[8] <= errors[2] + 1e-6
