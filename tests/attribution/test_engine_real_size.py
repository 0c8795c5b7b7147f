"""ViT-B-32 at real size beyond the last blocks: the engine at a middle block against a stored result of
the reference (``exclip`` 1.1), and reduced precision against float32.

The reference at a middle block with N = 10 takes about 20 minutes of CPU, so its matrix is stored
(``real_size_reference.npz``, written by ``tests/attribution/real_size_reference.py`` from open_clip's
ViT-B-32 with seeded random weights); the test rebuilds the same model and inputs, checks that they are
the same (their embeddings), and compares the engine with the stored matrix, CLS column included. The
last blocks are compared with the live reference in test_engine_live.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.explainer import Explainer
from testing import random_clip
from tests.attribution.real_size_reference import LONG_CAPTION, STORED, embeddings


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Max error relative to the largest reference entry (of ``scale`` if given)."""
    return float((a - b).abs().max() / (b if scale is None else scale).abs().max())


@pytest.fixture(scope="module")
def vit_b32():
    return random_clip("ViT-B-32")


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    # The file is committed; its script regenerates it (about 13 CPU minutes of the reference).
    assert STORED.exists(), f"{STORED.name} is missing: run tests/attribution/real_size_reference.py"
    with np.load(STORED) as data:
        return {key: data[key] for key in data.files}


def test_stored_reference_is_compact_and_complete(stored):
    assert STORED.stat().st_size < 1_000_000
    assert str(stored["caption"]) == LONG_CAPTION
    assert int(stored["steps"]) == 10
    assert stored["matrix"].dtype == np.float32
    assert stored["matrix"].shape == (27, 50)  # SOT + 25 tokens + EOT, CLS + 7 × 7 patches
    assert np.isfinite(stored["matrix"]).all()


@pytest.mark.slow
def test_vit_b32_matches_stored_reference_at_a_middle_block(vit_b32, stored):
    model, tokenizer, image = vit_b32
    # The precondition: the same random model and input as when the reference ran (else a new torch or
    # open_clip initialises differently, and the stored file must be regenerated, see its script).
    text_emb, image_emb = embeddings(model, tokenizer, image)
    np.testing.assert_allclose(text_emb, stored["text_embedding"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(image_emb, stored["image_embedding"], rtol=1e-4, atol=1e-5)

    expected = torch.from_numpy(stored["matrix"])
    text_layer, image_layer = int(stored["text_layer"]), int(stored["image_layer"])
    assert 0 < text_layer < 11 and 0 < image_layer < 11  # a middle block of both towers
    explainer = Explainer(model, tokenizer, text_layer, image_layer, steps=int(stored["steps"]))
    result = explainer.explain(image, [LONG_CAPTION])[0]
    assert result.interactions.shape == (27, 7, 7)
    assert relative_error(result.interactions.flatten(1), expected[:, 1:]) <= 1e-4
    assert relative_error(result.cls, expected[:, 0], scale=expected) <= 1e-4
    assert expected[:, 0].abs().max() > 1e-3 * expected.abs().max()  # a column worth comparing


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
