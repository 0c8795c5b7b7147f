"""The engine against the oracle (tests/attribution/oracle.py) on every model family, every block, N ∈ {1,
3, 10}: the caption × patch matrix, the extra columns (class token, registers summed), the extra row
(padding a bidirectional text tower reads, summed), their corner and the completeness figures, all within
1e-5 of the largest entry.

The oracle knows nothing of the engine's rows: it attributes every row entering the cut block. Here its
full matrix is folded the way ``PairResult`` reports it, with the caption's rows counted from the
tokenizer's own output.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from attribution.explainer import Explainer, PairResult
from attribution.models import unsupported_reason
from testing import build_family, family_arch, perturb_norms_and_biases
from tests.attribution import oracle

CAPTION = "a red dog"
TOLERANCE = 1e-5  # relative to the largest reported entry of the oracle
LAYERS = 3  # blocks per tower in every tiny family
GRID = (4, 4)  # 32 px images, 8 px patches
# Image rows before the patches: (class token rows, register rows).
IMAGE_PREFIX = {
    "siglip": (0, 0),
    "siglip2": (0, 0),
    "clipa": (1, 0),
    "metaclip2": (1, 0),
    "timm-cls": (1, 2),
    "clip": (1, 0),
}
FAMILIES = ["siglip", "siglip2", "clipa", "metaclip2", "timm-cls"]  # CLIP: tests/attribution/test_oracle.py
CAUSAL = {"metaclip2", "timm-cls"}  # causal text towers; SigLIP's and CLIPA's attend both ways


def caption_rows(name: str, tokenizer, tokens: torch.Tensor) -> int:
    """The caption's rows as its tokenizer gives them (start token … end token), from the tokenizer."""
    if name == "timm-cls":  # CLIP's BPE: SOT … EOT, EOT the highest id
        return int(tokens[0].argmax()) + 1
    ids = tokenizer.tokenizer(tokenizer.clean_fn(CAPTION))["input_ids"]
    return len(ids) - int(bool(tokenizer.strip_sep_token))  # CLIPA's [SEP] is turned into padding


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest):
    model, tokenizer = build_family(request.param)
    model = perturb_norms_and_biases(model)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return request.param, model, tokenizer, image


@pytest.fixture(scope="module")
def oracles(family):
    """One oracle per pair of cut blocks (text l, image LAYERS − 1 − l), each point computed once."""
    name, model, tokenizer, image = family
    tokens = tokenizer([CAPTION])
    reference = oracle.text_reference(model, tokenizer)
    return {
        layer: oracle.PairOracle(model, tokens, image, layer, LAYERS - 1 - layer, reference)
        for layer in range(LAYERS)
    }


def folded(name: str, matrix: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """The oracle's full matrix as PairResult reports it."""
    cls_rows, registers = IMAGE_PREFIX[name]
    start = cls_rows + registers
    caption, padding = matrix[:rows], matrix[rows:]
    parts = {"interactions": caption[:, start:].reshape(rows, *GRID)}
    extra_columns = {}
    if cls_rows:
        extra_columns["cls"] = matrix[:, 0]
    if registers:
        extra_columns["registers"] = matrix[:, cls_rows:start].sum(dim=1)
    parts.update({f"column {k}": v[:rows] for k, v in extra_columns.items()})
    parts["padding"] = padding[:, start:].sum(dim=0).reshape(GRID)
    corner = torch.zeros((), dtype=matrix.dtype)
    parts["corner"] = corner + sum(v[rows:].sum() for v in extra_columns.values())
    return parts


def reported(result: PairResult) -> dict[str, torch.Tensor]:
    parts = {"interactions": result.interactions}
    parts.update({f"column {k}": v for k, v in result.extra_columns.items()})
    return parts


def assert_engine_is_oracle(name: str, result: PairResult, expected: oracle.OracleResult, rows: int) -> None:
    """The engine's result equals the oracle's full matrix folded as PairResult reports it."""
    want = folded(name, expected.matrix, rows)
    got = reported(result)
    assert result.interactions.shape == (rows, *GRID)
    assert set(got) == {k for k in want if k.startswith(("interactions", "column"))}
    scale = max(float(v.abs().max()) for v in want.values())
    for key, value in got.items():
        assert float((value.double() - want[key]).abs().max()) <= TOLERANCE * scale, key
    if name in CAUSAL:  # nothing after the pooled end token is read
        assert float(expected.matrix[rows:].abs().max()) == 0
        assert result.extra_rows == {} and result.corner == 0
    else:  # a bidirectional tower reads its padding rows: they are reported, summed
        assert set(result.extra_rows) == {"padding"}
        padding = result.extra_rows["padding"].double()
        assert float((padding - want["padding"]).abs().max()) <= TOLERANCE * scale
        assert abs(result.corner - float(want["corner"])) <= TOLERANCE * scale
    if "column cls" not in want:
        assert result.cls is None
    completeness = result.completeness
    for got_value, want_value in [
        (completeness.total, expected.total),
        (completeness.path_expected, expected.path_expected),
        (completeness.expected, expected.expected),
        (float(result.entries().double().sum()), expected.total),
    ]:  # sums of cancelling float32 terms: relative to the sum of the magnitudes
        assert abs(got_value - want_value) <= TOLERANCE * float(expected.matrix.abs().sum())


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("layer", range(LAYERS))
def test_engine_is_the_oracle_at_every_block(family, oracles, layer, steps):
    name, model, tokenizer, image = family
    tokens = tokenizer([CAPTION])
    rows = caption_rows(name, tokenizer, tokens)
    expected = oracles[layer].result(oracle.right_riemann(steps))
    explainer = Explainer(model, tokenizer, layer, LAYERS - 1 - layer, steps)
    result = explainer.explain_tokens(image, [tokens[0]])[0]  # the ids as the model's tokenizer gives them
    assert_engine_is_oracle(name, result, expected, rows)
    if name not in CAUSAL:  # entering block 0 a padding row is its token and position, as in the reference
        assert (float(expected.matrix[rows:].abs().max()) > 0) == (layer > 0)


def test_engine_is_the_oracle_under_a_weighted_rule(family, oracles):
    """Gauss–Legendre (numpy's nodes and weights in the oracle, the engine's own construction)."""
    name, model, tokenizer, image = family
    tokens = tokenizer([CAPTION])
    expected = oracles[1].result(oracle.gauss_legendre(4))
    explainer = Explainer(model, tokenizer, 1, LAYERS - 2, 4, quadrature="gauss-legendre")
    result = explainer.explain_tokens(image, [tokens[0]])[0]
    assert_engine_is_oracle(name, result, expected, caption_rows(name, tokenizer, tokens))
    assert result.integration is not None and result.integration.rule == "gauss-legendre"


def test_engine_explains_a_caption_of_every_family(family, oracles):
    """From the caption string (the engine's own tokenization with character offsets), the same result
    as from the tokenizer's ids (CLIPA's too: its [SEP], written over with padding, is no row)."""
    name, model, tokenizer, image = family
    explainer = Explainer(model, tokenizer, 1, 1, 3)
    from_ids = explainer.explain_tokens(image, [tokenizer([CAPTION])[0]])[0]
    assert unsupported_reason(open_clip.get_model_config(family_arch(name))) is None
    from_text = explainer.explain(image, [CAPTION])[0]
    assert torch.equal(from_text.entries(), from_ids.entries())
