"""Every tower family the engine explains, on tiny random models (``testing.families``): the towers
reproduce the model's embeddings, forward, reverse and contraction routes agree, the sum of everything
converges to the value the path explains, extra rows and columns are reported, and what the engine
cannot do is refused with a reason."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attribution.errors import UnsupportedModel
from attribution.explainer import Explainer, PairResult
from attribution.tail import dense_token_vjps, embed, pooled_token_vjps, token_jvps
from attribution.towers import image_tower, text_tower
from testing.families import build_family
from testing.models import perturb_norms_and_biases

FAMILIES = ("clip", "siglip", "siglip2", "clipa", "metaclip2", "timm-cls")
NON_CAUSAL = ("siglip", "siglip2", "clipa")
LAYERS = (1, 2)  # a middle block and the last of the tiny towers' three
CAPTION = "a cat"


@cache
def family(name: str) -> tuple[Any, Any]:
    model, tokenizer = build_family(name)
    return perturb_norms_and_biases(model), tokenizer


def image() -> Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def caption_ids(name: str) -> Tensor:
    """The caption as the model's tokenizer gives it (padded to its context)."""
    _, tokenizer = family(name)
    ids: Tensor = tokenizer([CAPTION])[0]
    return ids


def explain(name: str, layer: int | None, steps: int = 8, **options: Any) -> PairResult:
    model, tokenizer = family(name)
    explainer = Explainer(model, tokenizer, text_layer=layer, image_layer=layer, steps=steps, **options)
    return explainer.explain_tokens(image(), [caption_ids(name)])[0]


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layer", [0, *LAYERS])
@pytest.mark.parametrize("name", FAMILIES)
def test_towers_cut_at_any_block_give_the_models_embeddings(name: str, layer: int) -> None:
    model, tokenizer = family(name)
    explainer = Explainer(model, tokenizer)
    cpu = torch.device("cpu")
    tower = image_tower(model)
    pool = torch.full((1,), tower.layout.pool_row or 0)
    ours = embed(tower.tail(layer, torch.float32, cpu), tower.hidden(image(), layer), pool)
    assert relative(ours, model.encode_image(image())) < 1e-5

    text = text_tower(model)
    ids = explainer._text_inputs(caption_ids(name)).unsqueeze(0)
    ours = embed(text.tail(layer, torch.float32, cpu), text.hidden(ids, layer), text.pool_index(ids))
    assert relative(ours, model.encode_text(caption_ids(name).unsqueeze(0))) < 1e-5


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_forward_and_reverse_modes_agree_on_both_towers(name: str, layer: int) -> None:
    model, tokenizer = family(name)
    explainer = Explainer(model, tokenizer, text_layer=layer, image_layer=layer)
    cpu = torch.device("cpu")
    tower = image_tower(model)
    refs = explainer._references((32, 32))
    ids = explainer._text_inputs(caption_ids(name)).unsqueeze(0)
    text = text_tower(model)
    cases = [
        (tower.tail(layer, torch.float32, cpu), tower.hidden(image(), layer), refs["image"], torch.zeros(1)),
        (text.tail(layer, torch.float32, cpu), text.hidden(ids, layer), refs["text"], text.pool_index(ids)),
    ]
    for tail, hidden, ref, pool in cases:
        s = hidden.shape[1]
        x = (ref[:s] + 0.4 * (hidden[0] - ref[:s])).unsqueeze(0)
        delta = (hidden[0] - ref[:s]).unsqueeze(0)
        pool = pool.long().view(1)
        forward = token_jvps(tail, x, delta, pool, max_tangents=1 << 20)
        reverse = dense_token_vjps(tail, x, delta, pool, chunk=64)
        assert relative(forward, reverse) < 1e-5
        if tail.pooling is not None:  # the first block's attention contracted in closed form
            assert relative(pooled_token_vjps(tail, x, delta, chunk=5), reverse) < 1e-5
            cotangents = torch.randn(3, reverse.shape[-1])
            contracted = pooled_token_vjps(tail, x, delta, chunk=2, cotangents=cotangents)
            assert relative(contracted, reverse @ cotangents.T) < 1e-5
        small = token_jvps(tail, x, delta, pool, max_tangents=s)  # tangents in several chunks
        assert relative(small, forward) < 1e-6


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_contraction_route_equals_the_factor_route(name: str, layer: int) -> None:
    factor = explain(name, layer, contraction=False)
    contracted = explain(name, layer, contraction=True)
    assert relative(contracted.entries(), factor.entries()) < 1e-5


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_sum_of_everything_converges_to_what_the_path_explains(name: str, layer: int) -> None:
    coarse, fine = explain(name, layer, steps=16), explain(name, layer, steps=64)
    for result in (coarse, fine):
        c = result.completeness
        assert abs(float(result.entries().sum()) - c.total) <= 1e-5 * max(abs(c.total), 1e-3)
    # The right Riemann sum's error shrinks as 1/N: four times the points, about a quarter of the error.
    assert abs(fine.completeness.integration_gap) < 0.4 * abs(coarse.completeness.integration_gap)
    if name in NON_CAUSAL:  # input and reference pooled on the same row: the path ends at h(t) − h(r)
        c = fine.completeness
        assert abs(c.path_expected - c.expected) <= 1e-6 * max(abs(c.expected), 1e-3)


def test_rows_and_columns_beside_the_matrix() -> None:
    clip = explain("clip", None)
    assert set(clip.extra_columns) == {"cls"} and not clip.extra_rows and clip.corner == 0.0
    assert clip.cls is not None and torch.equal(clip.extra_columns["cls"], clip.cls)

    timm = explain("timm-cls", None)
    assert set(timm.extra_columns) == {"cls", "registers"}
    assert timm.extra_columns["registers"].shape == (timm.interactions.shape[0],)
    assert float(timm.extra_columns["registers"].abs().sum()) > 0

    siglip2 = explain("siglip2", None)
    assert siglip2.cls is None and not siglip2.extra_columns
    ids = caption_ids("siglip2")
    _, tokenizer = family("siglip2")
    end = int((ids == tokenizer.tokenizer.eos_token_id).nonzero()[0]) + 1
    assert siglip2.interactions.shape == (end, 4, 4)  # the caption's tokens up to its end token
    assert siglip2.extra_rows["padding"].shape == (4, 4)
    assert float(siglip2.extra_rows["padding"].abs().sum()) > 0


def test_padding_row_is_the_sum_of_the_padding_rows() -> None:
    """The padding row equals the padding rows' interactions summed (by the factors, one row each)."""
    model, tokenizer = family("siglip2")
    explainer = Explainer(model, tokenizer, steps=4)
    ids = caption_ids("siglip2")
    text, image_side = explainer._pairs(image(), [ids])[0][0]
    n = text.caption_rows
    full = text.factor(explainer.rule).T @ image_side.factor(explainer.rule)
    result = explainer.explain_tokens(image(), [ids])[0]
    scale = result.interactions.flatten().abs().max() / full[:n].abs().max()
    assert relative(result.extra_rows["padding"].flatten() / scale, full[n:].sum(0)) < 1e-5


def test_refused_with_a_reason() -> None:
    model, _ = build_family("siglip")
    attn = model.visual.trunk.blocks[1].attn
    attn.q_norm = nn.LayerNorm(attn.head_dim)
    with pytest.raises(UnsupportedModel, match="q/k norms"):
        image_tower(model)

    model, _ = build_family("siglip")
    model.visual.trunk.global_pool = "avgmax"
    with pytest.raises(UnsupportedModel, match="avgmax"):
        image_tower(model)

    model, _ = build_family("siglip")
    model.text.pool_type = "first"
    with pytest.raises(UnsupportedModel, match="'first' is not supported"):
        text_tower(model)

    model, _ = build_family("metaclip2")
    model.attn_mask = None  # EOS pooling needs the causal mask that cuts the rows after it
    with pytest.raises(UnsupportedModel, match="non-causal"):
        text_tower(model)
