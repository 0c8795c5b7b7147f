"""The engine computes in IEEE float32 whatever the caller set: TF32 (cuDNN convolutions by default, cuBLAS
matmuls when enabled) and oneDNN's bfloat16 float32 mode are off inside every explanation and the
caller's settings are back afterwards, on error too.

The flags are plain process state, so this is checked on CPU: read inside the engine's call by forward
hooks on the model's first layers, and on the result itself, where oneDNN's reduced float32 mode does
change CPU products. The GPU's numbers (TF32 on vs off against the reference) are bench/gpu_check.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from attribution.explainer import Explainer
from attribution.models import TINY_MODEL
from testing import random_clip

CAPTION = "a photo of a brown dog, with a red ball"
BACKENDS = {
    "cuda.matmul": torch.backends.cuda.matmul,
    "cudnn.conv": torch.backends.cudnn.conv,
    "mkldnn.matmul": torch.backends.mkldnn.matmul,
    "mkldnn.conv": torch.backends.mkldnn.conv,
}
# What a caller may have set: every backend in a reduced float32 mode.
CALLER = {"cuda.matmul": "tf32", "cudnn.conv": "tf32", "mkldnn.matmul": "bf16", "mkldnn.conv": "bf16"}


def precisions() -> dict[str, str]:
    return {name: backend.fp32_precision for name, backend in BACKENDS.items()}


@pytest.fixture
def caller_settings() -> Iterator[dict[str, str]]:
    """The caller's reduced float32 settings for one test; the process's own restored after it."""
    saved = precisions()
    for name, value in CALLER.items():
        BACKENDS[name].fp32_precision = value
    try:
        yield precisions()
    finally:
        for name, value in saved.items():
            BACKENDS[name].fp32_precision = value


@pytest.fixture(scope="module")
def tiny():
    return random_clip(TINY_MODEL)


def test_inside_the_engine_float32_is_ieee_and_the_caller_gets_its_settings_back(tiny, caller_settings):
    model, tokenizer, image = tiny
    assert caller_settings == CALLER  # the precondition: the caller's settings are not IEEE
    seen: list[dict[str, str]] = []
    # The image's patch convolution and the text's token embedding run inside the engine's call.
    hooks = [
        model.visual.conv1.register_forward_pre_hook(lambda *_: seen.append(precisions())),
        model.token_embedding.register_forward_pre_hook(lambda *_: seen.append(precisions())),
    ]
    try:
        Explainer(model, tokenizer, steps=2).explain(image, [CAPTION])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) >= 2
    assert all(flags == dict.fromkeys(BACKENDS, "ieee") for flags in seen), seen
    assert precisions() == CALLER


def test_the_caller_gets_its_settings_back_when_the_engine_raises(tiny, caller_settings):
    model, tokenizer, image = tiny

    def fail(*_: object) -> None:
        raise RuntimeError("inside the engine")

    hook = model.visual.conv1.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the engine"):
            Explainer(model, tokenizer, steps=2).explain(image, [CAPTION])
    finally:
        hook.remove()
    assert precisions() == CALLER


def test_a_callers_reduced_float32_mode_does_not_change_the_result(tiny):
    """``set_float32_matmul_precision("medium")`` makes oneDNN compute float32 products in bfloat16 on
    CPU (measurably, on this machine's CPU: about 1e-6 relative on a linear layer); the engine's
    result must be the same bit for bit."""
    model, tokenizer, image = tiny
    exact = Explainer(model, tokenizer, steps=3).explain(image, [CAPTION])[0]
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the precondition
        medium = Explainer(model, tokenizer, steps=3).explain(image, [CAPTION])[0]
    finally:
        torch.set_float32_matmul_precision(saved)
    assert torch.equal(medium.interactions, exact.interactions)
    assert torch.equal(medium.cls, exact.cls)
