"""The poolings that read every row: forwards equal timm's / open_clip's, tangents equal autodiff's."""

from __future__ import annotations

import pytest
import torch
from timm.layers.attention_pool import AttentionPoolLatent
from torch import Tensor, nn
from torch.func import jvp

from attribution.pooling import LatentPool, MeanPool
from attribution.tail import layer_norm_weights
from attribution.towers import _latent_pool

DT = torch.float64
CPU = torch.device("cpu")


def perturbed_layer_norm(width: int) -> nn.LayerNorm:
    ln = nn.LayerNorm(width, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(width, dtype=DT))
        ln.bias.add_(0.3 * torch.randn(width, dtype=DT))
    return ln


def check_tangent(pool: MeanPool | LatentPool, x: Tensor, dx: Tensor) -> None:
    """The pooling's own tangent against torch.func.jvp of its forward, tangent by tangent (to float32
    rounding: layer-norm tangents take their statistics in float32 whatever the dtype)."""
    pooled, tangents = pool.tangent(x, dx)
    assert torch.allclose(pooled, pool(x), rtol=0, atol=1e-13)
    for c in range(dx.shape[1]):
        _, expected = jvp(pool, (x,), (dx[:, c],))
        assert torch.allclose(tangents[:, c], expected, rtol=1e-5, atol=1e-6 * expected.abs().max()), c


@pytest.mark.parametrize("start", [0, 1, 3])
@pytest.mark.parametrize("normed", [False, True])
def test_mean_pool_is_the_mean_after_the_norm_and_its_tangent_is_exact(start: int, normed: bool) -> None:
    torch.manual_seed(0)
    ln = perturbed_layer_norm(8)
    pool = MeanPool(start, layer_norm_weights(ln, DT, CPU) if normed else None)
    x = torch.randn(2, 7, 8, dtype=DT)
    rows = ln(x[:, start:]) if normed else x[:, start:]
    assert torch.allclose(pool(x), rows.mean(dim=1), rtol=0, atol=1e-14)
    check_tangent(pool, x, torch.randn(2, 3, 7, 8, dtype=DT))


def timm_latent_pool(width: int = 16, heads: int = 4) -> AttentionPoolLatent:
    torch.manual_seed(1)
    module = AttentionPoolLatent(width, num_heads=heads, mlp_ratio=2.0, norm_layer=nn.LayerNorm)
    module = module.double().eval()
    with torch.no_grad():
        module.norm.weight.add_(0.3 * torch.randn(width, dtype=DT))
        module.latent.normal_()
    return module


@pytest.mark.parametrize("start", [0, 2])
def test_latent_pool_is_timms_attention_pool_and_its_tangent_is_exact(start: int) -> None:
    module = timm_latent_pool()
    ln = perturbed_layer_norm(16)
    pool = _latent_pool(module, start, layer_norm_weights(ln, DT, CPU), DT, CPU)
    x = 3 * torch.randn(2, 9, 16, dtype=DT)
    expected = module(ln(x[:, start:]))
    assert torch.allclose(pool(x), expected, rtol=0, atol=1e-12)
    check_tangent(pool, x, torch.randn(2, 3, 9, 16, dtype=DT))


def test_latent_pool_tangent_follows_every_row() -> None:
    """A tangent on any one row moves the pooled vector (the attention reads every row)."""
    module = timm_latent_pool()
    pool = _latent_pool(module, 0, None, DT, CPU)
    x = torch.randn(1, 5, 16, dtype=DT)
    dx = torch.zeros(1, 5, 5, 16, dtype=DT)
    for row in range(5):
        dx[0, row, row] = torch.randn(16, dtype=DT)
    _, tangents = pool.tangent(x, dx)
    assert (tangents.norm(dim=-1) > 1e-6).all()
