"""ViT-B-32 at real size: reduced precision against float32 (the tiny model's bounds hold here too).

The comparisons with the reference at real size are in test_engine_live.py.
"""

from __future__ import annotations

import pytest
import torch

from attribution.explainer import Explainer
from tests.attribution.real_size_reference import LONG_CAPTION
from tests.harness import random_clip


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max error relative to the largest reference entry (of ``scale`` if given)."""
    return float((a - b).abs().max() / (b if scale is None else scale).abs().max())


@pytest.fixture(scope="module")
def vit_b32():
    return random_clip("ViT-B-32")


# Measured 2026-12-07 on the 2-core CPU machine, this model and caption, N = 10, max error relative to
# the largest float32 entry: last blocks bfloat16 8.0e-3 (patches) and 3.1e-3 (CLS column included),
# float16 8.9e-4 and 3.9e-5; at the middle block (text 6, image 5) bfloat16 6.7e-3 and 1.1e-3. The
# bounds are the ones the tiny model is held to (test_explainer.py) and the README states, about 3x
# above what was measured here.
REDUCED_PRECISION_BOUNDS = {"bfloat16": 2.5e-2, "float16": 3e-3}


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(REDUCED_PRECISION_BOUNDS))
def test_vit_b32_reduced_precision_error_is_bounded(vit_b32, precision):
    model, tokenizer, image = vit_b32
    exact = Explainer(model, tokenizer, steps=10).explain(image, [LONG_CAPTION])[0]
    low = Explainer(model, tokenizer, steps=10, precision=precision).explain(image, [LONG_CAPTION])[0]
    bound = REDUCED_PRECISION_BOUNDS[precision]
    error = relative_error(low.interactions, exact.interactions)
    assert 0 < error < bound, error  # 0: the reduced precision was really used
    # The CLS column's largest entry (the EOT row) is far above every patch entry: relative to the
    # whole matrix, as the reference's comparisons do.
    whole = torch.cat([exact.cls, exact.interactions.flatten()])
    assert relative_error(low.cls, exact.cls, scale=whole) < bound
    # Embeddings and completeness stay float32: the score is the same, the sum moves by the error only.
    assert low.score == exact.score
    assert low.completeness.expected == exact.completeness.expected
    total_moved = abs(low.completeness.total - exact.completeness.total)
    assert total_moved == pytest.approx(abs(low.completeness.gap - exact.completeness.gap), abs=1e-9)
