"""The oracle (tests/attribution/oracle.py) is checked here against the authors' reference and against the
method's own identity, on every model family; then today's engine is checked against it on CLIP.

The oracle differentiates the real modules densely in float64 and multiplies the Jacobians out over all
rows, so it shares nothing with the engine's factorised float32 tails: where both agree to 1e-5 of the
largest entry, the engine computes the method.
"""

from __future__ import annotations

import pytest
import torch
from exclip.explanation import OpenClipExplainer

from attribution.explainer import Explainer
from testing import FAMILIES, build_family, perturb_norms_and_biases, random_clip
from tests.attribution import oracle

CAPTION = "a red dog"
TOLERANCE = 1e-5  # relative to the largest entry of the oracle's matrix
CAUSAL = {"clip", "metaclip2", "timm-cls"}  # text towers with a causal mask; the others attend both ways


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / scale.abs().max())


def image_for(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[torch.nn.Module, object, torch.Tensor]:
    model, tokenizer, image = random_clip("exclip-tiny")
    return perturb_norms_and_biases(model), tokenizer, image


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, object]:
    model, tokenizer = build_family(request.param)
    return request.param, perturb_norms_and_biases(model), tokenizer


def eot_row(tokens: torch.Tensor) -> int:
    return int(tokens[0].argmax())


# --- The oracle against the reference (exclip 1.1) -------------------------------------------------------


@pytest.mark.parametrize(("text_layer", "image_layer", "steps"), [(2, 2, 1), (1, 0, 3), (0, 1, 10)])
def test_oracle_is_the_reference_on_clip(tiny_clip, text_layer, image_layer, steps):
    model, tokenizer, image = tiny_clip
    tokens = tokenizer([CAPTION])
    reference = OpenClipExplainer(
        model, image_dim=image.shape[-1], text_seq_len=77, device=torch.device("cpu")
    )
    try:
        expected = reference.explain(tokens, image, text_layer=text_layer, image_layer=image_layer, N=steps)
    finally:
        reference.reset_attribution()
    result = oracle.explain(
        model, tokens, image, text_layer, image_layer, oracle.text_reference(model, tokenizer),
        oracle.right_riemann(steps),
    )  # fmt: skip
    eot = eot_row(tokens)
    patches = result.matrix[: eot + 1, 1:].reshape(expected.shape)  # the reference drops CLS and padding
    assert relative_error(patches, expected, expected) <= TOLERANCE
    assert torch.equal(result.matrix[eot + 1 :], torch.zeros_like(result.matrix[eot + 1 :]))  # causal
    cls = float(result.matrix[:, 0].abs().max())
    if image_layer > 0:  # entering block 0 the class token is a constant: its column is zero
        assert cls > 1e-3 * float(result.matrix.abs().max())  # a CLS column worth comparing
    else:
        assert cls == 0


# --- The oracle against the method's identity, every family ----------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_oracle_sums_to_the_path_value_on_every_family(family, layer):
    """With an accurate rule (Gauss–Legendre, 16 points) the full matrix sums to the value of the path
    integral, ``(h(t) − h(path start))·(g(x) − g(r_x))``: the hooks replace the right rows and the
    Jacobians are those of the real forward pass."""
    name, model, tokenizer = family
    tokens, image = tokenizer([CAPTION]), image_for(model)
    reference = oracle.text_reference(model, tokenizer)
    result = oracle.explain(model, tokens, image, layer, layer, reference, oracle.gauss_legendre(16))
    # Relative to the sum of magnitudes (the entries cancel); measured at most 6e-5 (MetaCLIP 2 at
    # block 0, whose integrand is the least smooth), 1e-7 elsewhere. A wrongly pooled path is off by %.
    assert abs(result.total - result.path_expected) <= 1e-4 * float(result.matrix.abs().sum())
    if name not in CAUSAL:  # pooled on the last row: the reference is pooled where the input is
        assert result.path_expected == pytest.approx(result.expected, rel=1e-9)
    else:  # pooled on the input's end token, which the reference has elsewhere (or is padding there)
        assert abs(result.path_expected - result.expected) > 1e-3 * abs(result.expected)


def test_oracle_rows_follow_each_towers_conventions(family):
    """All rows are attributed: a bidirectional text tower gives every row (padding too) a value; a
    causal one none after the row it pools; image rows are the class token, registers and patches."""
    name, model, tokenizer = family
    tokens, image = tokenizer([CAPTION]), image_for(model)
    result = oracle.explain(
        model, tokens, image, 1, 1, oracle.text_reference(model, tokenizer), oracle.right_riemann(2)
    )
    rows = result.matrix.abs().amax(dim=1)
    context = tokens.shape[1]
    assert result.matrix.shape[0] == context
    if name in CAUSAL:
        pooled = eot_row(tokens) if name != "metaclip2" else int((tokens[0] == 2).nonzero()[0])
        assert torch.equal(rows[pooled + 1 :], torch.zeros(context - pooled - 1, dtype=rows.dtype))
        assert rows[pooled] > 0
    else:
        assert (rows > 0).all()
    patches = 16  # 32 px at 8 px per patch in every tiny family
    prefix = {"siglip": 0, "siglip2": 0, "timm-cls": 3}.get(name, 1)  # class token, registers
    assert result.matrix.shape[1] == prefix + patches
    assert (result.matrix.abs().amax(dim=0) > 0).all()


# --- Today's engine against the oracle, CLIP ---------------------------------------------------------------


def compare_clip(explainer: Explainer, tokenizer, model, image, result: oracle.OracleResult) -> None:
    tokens = tokenizer([CAPTION])
    eot = eot_row(tokens)
    pair = explainer.explain(image, [CAPTION])[0]
    matrix = result.matrix
    assert relative_error(pair.interactions.flatten(1), matrix[: eot + 1, 1:], matrix) <= TOLERANCE
    assert relative_error(pair.cls, matrix[: eot + 1, 0], matrix) <= TOLERANCE
    assert matrix[eot + 1 :].abs().max() == 0  # the rows the engine leaves out hold nothing
    scale = matrix.abs().max()
    assert abs(pair.completeness.total - result.total) <= TOLERANCE * scale
    assert abs(pair.completeness.path_expected - result.path_expected) <= TOLERANCE * scale
    assert abs(pair.completeness.expected - result.expected) <= TOLERANCE * scale


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_engine_is_the_oracle_on_clip_at_every_layer(tiny_clip, layer, steps):
    model, tokenizer, image = tiny_clip
    text_layer, image_layer = layer, 2 - layer  # every block of both towers
    tokens = tokenizer([CAPTION])
    result = oracle.explain(
        model, tokens, image, text_layer, image_layer, oracle.text_reference(model, tokenizer),
        oracle.right_riemann(steps),
    )  # fmt: skip
    compare_clip(Explainer(model, tokenizer, text_layer, image_layer, steps), tokenizer, model, image, result)


def test_engine_is_the_oracle_under_a_weighted_rule(tiny_clip):
    """Gauss–Legendre weights from numpy in the oracle, the engine's own construction in the engine."""
    model, tokenizer, image = tiny_clip
    tokens = tokenizer([CAPTION])
    result = oracle.explain(
        model, tokens, image, 1, 1, oracle.text_reference(model, tokenizer), oracle.gauss_legendre(5)
    )
    explainer = Explainer(model, tokenizer, 1, 1, 5, quadrature="gauss-legendre")
    compare_clip(explainer, tokenizer, model, image, result)
