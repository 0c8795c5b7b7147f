"""Quadrature rules and tolerances of the engine.

Each rule is checked against an independent slow computation of the same rule: open_clip's own
modules, the hooked block's input replaced through a forward pre-hook, full Jacobians by autograd at
every point, integrated with the rule's weights here. The tolerance is checked against a converged run.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.errors import InvalidOption
from attribution.explainer import Explainer
from attribution.models import DEMO_MODEL, DEMO_PRETRAINED, TINY_MODEL, load_model
from attribution.quadrature import (
    CLENSHAW_CURTIS,
    GAUSS_LEGENDRE,
    MIDPOINT,
    NESTED_RULES,
    RIEMANN,
    RULES,
    TOLERANCE_MAX_POINTS,
    TRAPEZOID,
    Rule,
    min_points,
    nested_sizes,
    point_key,
    quadrature_rule,
    right_riemann_points,
)
from testing import perturb_norms_and_biases

IMAGE_SIZE = 32
CAPTION = "a red ball on green grass"
# Highest polynomial degree each rule integrates exactly with n points.
EXACT_DEGREE = {
    RIEMANN: lambda n: 0,
    MIDPOINT: lambda n: 1,
    TRAPEZOID: lambda n: 1,
    GAUSS_LEGENDRE: lambda n: 2 * n - 1,
    CLENSHAW_CURTIS: lambda n: n - 1 if n % 2 == 0 else n,
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    perturb_norms_and_biases(model)
    return model, open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(11))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 17])
def test_rules_integrate_polynomials_of_their_degree(name, n):
    if n < min_points(name):
        with pytest.raises(InvalidOption, match="at least"):
            quadrature_rule(name, n)
        return
    rule = quadrature_rule(name, n)
    weights = torch.full((n,), 1 / n, dtype=torch.float64) if rule.weights is None else rule.weights
    assert len(rule) == n and bool(((rule.points >= 0) & (rule.points <= 1)).all())
    degree = EXACT_DEGREE[name](n)
    for d in range(degree + 1):
        assert float((weights * rule.points**d).sum()) == pytest.approx(1 / (d + 1), abs=1e-12)
    if n <= 5:  # the next degree is not exact: the degree above is the rule's (checked where it is clear)
        d = degree + 1
        assert abs(float((weights * rule.points**d).sum()) - 1 / (d + 1)) > 1e-6


def test_riemann_is_the_authors_points_with_equal_weights():
    rule = quadrature_rule(RIEMANN, 10)
    assert rule.weights is None
    assert torch.equal(rule.points, right_riemann_points(10))
    assert torch.equal(rule.points, 1.0 - torch.arange(10, dtype=torch.float64) / 10)


@pytest.mark.parametrize("name", NESTED_RULES)
def test_nested_rules_reuse_every_point(name):
    sizes = nested_sizes()
    assert sizes[0] == 3 and sizes[-1] == TOLERANCE_MAX_POINTS
    for coarse, fine in zip(sizes, sizes[1:], strict=False):
        assert fine == 2 * coarse - 1
        fine_keys = {point_key(float(a)) for a in quadrature_rule(name, fine).points}
        assert {point_key(float(a)) for a in quadrature_rule(name, coarse).points} <= fine_keys


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(RULES), st.integers(min_value=2, max_value=200))
def test_rules_weights_are_positive_and_sum_to_one(name, n):
    rule = quadrature_rule(name, n)
    weights = torch.full((n,), 1 / n, dtype=torch.float64) if rule.weights is None else rule.weights
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((weights > 0).all())  # all these rules have positive weights: no cancellation
    assert len({point_key(float(a)) for a in rule.points}) == n


# ------------------------------------------------------------------------------ the slow oracle


def _replaced_input(block: torch.nn.Module, x: torch.Tensor):
    """A forward pre-hook that feeds ``x`` (S, W) to ``block`` in place of what it would get."""

    def hook(_module, args):
        return (x.unsqueeze(0).to(args[0].dtype), *args[1:])

    return block.register_forward_pre_hook(hook)


def _captured_input(block: torch.nn.Module, run) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()[0].clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def _slow_factor(encode, block, hidden, reference, rule: Rule) -> torch.Tensor:
    """Σ_n w_n · J(α_n)·Δ per token by full autograd Jacobians of open_clip's own encoder: (E, S)."""
    delta = hidden - reference
    weights = torch.full((len(rule),), 1 / len(rule)) if rule.weights is None else rule.weights.float()
    total = torch.zeros(())
    for alpha, weight in zip(rule.points.float(), weights, strict=True):
        point = reference + alpha * delta

        def embedding(x: torch.Tensor) -> torch.Tensor:
            handle = _replaced_input(block, x)
            try:
                return encode()[0]
            finally:
                handle.remove()

        jacobian = torch.autograd.functional.jacobian(embedding, point)  # (E, S, W)
        total = total + weight * (jacobian * delta).sum(-1)
    return total


def slow_explanation(model, tokenizer, image, caption, layers, rule: Rule) -> torch.Tensor:
    """The token × image-token matrix (CLS column first) of one pair under ``rule``."""
    text_layer, image_layer = layers
    tokens = tokenizer([caption])
    ref_tokens = torch.zeros_like(tokens)
    ref_tokens[0, 0], ref_tokens[0, 2] = tokenizer.sot_token_id, tokenizer.eot_token_id
    text_block = model.transformer.resblocks[text_layer]
    image_block = model.visual.transformer.resblocks[image_layer]
    t_hidden = _captured_input(text_block, lambda: model.encode_text(tokens))
    t_ref = _captured_input(text_block, lambda: model.encode_text(ref_tokens))
    x_hidden = _captured_input(image_block, lambda: model.encode_image(image))
    x_ref = _captured_input(image_block, lambda: model.encode_image(torch.zeros_like(image)))
    text = _slow_factor(lambda: model.encode_text(tokens), text_block, t_hidden, t_ref, rule)
    img = _slow_factor(lambda: model.encode_image(image), image_block, x_hidden, x_ref, rule)
    with torch.no_grad():
        norm = model.encode_text(tokens)[0].norm() * model.encode_image(image)[0].norm()
    rows = int(tokens.argmax()) + 1
    return (text.T @ img / norm)[:rows]


def engine_matrix(result) -> torch.Tensor:
    return torch.cat([result.cls.unsqueeze(1), result.interactions.flatten(1)], dim=1)


@pytest.mark.parametrize(
    "name,n,layers",
    [
        (RIEMANN, 3, (1, 2)),
        (MIDPOINT, 3, (0, 1)),
        (TRAPEZOID, 3, (2, 0)),
        (GAUSS_LEGENDRE, 3, (1, 1)),
        (CLENSHAW_CURTIS, 4, (2, 2)),
        (GAUSS_LEGENDRE, 2, (0, 2)),
    ],
)
def test_engine_equals_the_same_rule_by_slow_autograd(tiny, image, name, n, layers):
    model, tokenizer = tiny
    rule = quadrature_rule(name, n)
    expected = slow_explanation(model, tokenizer, image, CAPTION, layers, rule)
    result = Explainer(model, tokenizer, *layers, n, quadrature=name).explain(image, [CAPTION])[0]
    assert result.integration is not None
    assert (result.integration.rule, result.integration.points) == (name, n)
    assert result.integration.error_estimate is None and result.integration.converged is None
    assert relative_error(engine_matrix(result), expected) <= 1e-4


def test_riemann_option_is_the_default_bit_for_bit(tiny, image):
    model, tokenizer = tiny
    default = Explainer(model, tokenizer, 1, 1, 6).explain(image, [CAPTION])[0]
    named = Explainer(model, tokenizer, 1, 1, 6, quadrature=RIEMANN).explain(image, [CAPTION])[0]
    explicit = Explainer(model, tokenizer, 1, 1, points=right_riemann_points(6)).explain(image, [CAPTION])[0]
    for other in (named, explicit):
        assert torch.equal(default.interactions, other.interactions)
        assert torch.equal(default.cls, other.cls)


def test_rules_differ_from_each_other(tiny, image):
    """Guards the test above: the option reaches the engine."""
    model, tokenizer = tiny
    matrices = [
        engine_matrix(Explainer(model, tokenizer, 1, 1, 5, quadrature=name).explain(image, [CAPTION])[0])
        for name in RULES
    ]
    for i in range(len(matrices)):
        for j in range(i):
            assert relative_error(matrices[i], matrices[j]) > 1e-5


def test_explain_rules_equals_one_rule_at_a_time(tiny, image):
    model, tokenizer = tiny
    explainer = Explainer(model, tokenizer, 0, 1)
    rules = [(name, quadrature_rule(name, 5)) for name in RULES]
    together = explainer.explain_rules(image, [tokenizer([CAPTION])[0]], rules)
    for (name, _), results in zip(rules, together, strict=True):
        alone = Explainer(model, tokenizer, 0, 1, 5, quadrature=name).explain(image, [CAPTION])[0]
        assert relative_error(engine_matrix(results[0]), engine_matrix(alone)) <= 1e-6


# ------------------------------------------------------------------------------------ tolerance


def _converged(model, tokenizer, image, caption, layers) -> tuple[torch.Tensor, float]:
    """Richardson on the authors' sums, 2·R(2N) − R(N) with N = 160 (the midpoint rule with 160
    points), and a bound on its own error: its distance to the same with N = 80 (midpoint errors fall
    as 1/N², so that distance is about three times its own error)."""
    explainer = Explainer(model, tokenizer, *layers)
    rules = [(f"R({n})", Rule(right_riemann_points(n), None)) for n in (80, 160, 320)]
    r80, r160, r320 = (
        engine_matrix(r[0]) for r in explainer.explain_rules(image, [tokenizer([caption])[0]], rules)
    )
    converged = 2 * r320 - r160
    return converged, relative_error(2 * r160 - r80, converged)


@pytest.mark.parametrize("rule", NESTED_RULES)
@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_tolerance_estimate_does_not_understate_the_error_tiny(tiny, image, rule, tolerance):
    model, tokenizer = tiny
    converged, uncertainty = _converged(model, tokenizer, image, CAPTION, (0, 1))
    assert uncertainty < tolerance / 10  # the converged run is good enough to judge this tolerance
    explainer = Explainer(model, tokenizer, 0, 1, quadrature=rule, tolerance=tolerance)
    result = explainer.explain(image, [CAPTION])[0]
    info = result.integration
    assert info is not None and info.rule == rule and info.points in nested_sizes()
    assert info.error_estimate is not None and info.converged is True
    assert info.error_estimate <= tolerance
    assert relative_error(engine_matrix(result), converged) <= info.error_estimate + uncertainty


@pytest.mark.parametrize("tolerance", [3e-2, 1e-3])
def test_tolerance_estimate_does_not_understate_the_error_demo(tolerance):
    """The demo model at 1/1, where its phrases localise best and the image integrand has a sharp peak."""
    loaded = load_model(DEMO_MODEL, DEMO_PRETRAINED)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    caption = "a large red circle and a small blue square"
    converged, uncertainty = _converged(loaded.model, loaded.tokenizer, image, caption, (1, 1))
    assert uncertainty < tolerance / 10
    result = Explainer(loaded.model, loaded.tokenizer, 1, 1, tolerance=tolerance).explain(image, [caption])[0]
    info = result.integration
    assert info is not None and info.rule == CLENSHAW_CURTIS
    assert info.error_estimate is not None
    if info.converged:
        assert info.error_estimate <= tolerance
    else:
        assert info.points == TOLERANCE_MAX_POINTS
    assert relative_error(engine_matrix(result), converged) <= info.error_estimate + uncertainty


def test_tolerance_stops_at_the_maximum_and_says_so(tiny, image):
    model, tokenizer = tiny
    result = Explainer(model, tokenizer, 0, 0, tolerance=1e-12).explain(image, [CAPTION])[0]
    info = result.integration
    assert info is not None
    assert info.points == TOLERANCE_MAX_POINTS and info.converged is False
    assert info.error_estimate is not None and info.error_estimate > 1e-12
    # The last level's rule, its points computed level by level instead of in one pass.
    full = Explainer(model, tokenizer, 0, 0, TOLERANCE_MAX_POINTS, quadrature=CLENSHAW_CURTIS)
    assert relative_error(result.interactions, full.explain(image, [CAPTION])[0].interactions) <= 1e-6


def test_tolerance_result_does_not_depend_on_the_batch(tiny, image):
    """A pair's level is decided by its own matrix; a shared side computed further for another pair
    gives the same bits."""
    model, tokenizer = tiny
    explainer = Explainer(model, tokenizer, 1, 0, tolerance=1e-3)
    other_image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(12))
    captions = [CAPTION, "dog", CAPTION]
    batch = explainer.explain(torch.cat([image, image, other_image]), captions)
    for result, img, caption in zip(batch, [image, image, other_image], captions, strict=True):
        single = explainer.explain(img, [caption])[0]
        assert torch.equal(result.interactions, single.interactions)
        assert result.integration == single.integration


def test_bad_quadrature_options_are_specific_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(InvalidOption, match="quadrature must be one of riemann, midpoint"):
        Explainer(model, tokenizer, quadrature="simpson")
    with pytest.raises(InvalidOption, match="needs at least 2 points"):
        Explainer(model, tokenizer, steps=1, quadrature=TRAPEZOID)
    with pytest.raises(InvalidOption, match="a tolerance needs a nested rule"):
        Explainer(model, tokenizer, quadrature=GAUSS_LEGENDRE, tolerance=1e-2)
    for bad in (0, 1, -0.1, math.nan, "0.1", True):
        with pytest.raises(InvalidOption, match="tolerance must be a number in"):
            Explainer(model, tokenizer, tolerance=bad)
    with pytest.raises(InvalidOption, match="either a tolerance or explicit points"):
        Explainer(model, tokenizer, tolerance=1e-2, points=[1.0, 0.5])
    with pytest.raises(InvalidOption, match="only with the riemann rule"):
        Explainer(model, tokenizer, points=[1.0, 0.5], quadrature=MIDPOINT)
