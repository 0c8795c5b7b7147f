"""Poolings that read every row of the last block's output, with their tangents.

A tower pooled on one row (class token, EOT, EOS, last) needs none of this: its last block runs on
that row only (:func:`attribution.tail.pooled_block_forward`). The poolings here make the embedding a
function of every row, so the last block runs on all rows and the tangents go through the pooling:

- :class:`MeanPool`: the mean of the rows from ``start`` on (open_clip's ``pool_type="avg"``, timm's
  ``global_pool="avg"``), optionally after a layer norm on every row. Linear after that norm.
- :class:`LatentPool`: timm's ``AttentionPoolLatent`` (``global_pool="map"``, SigLIP): one attention
  with a learned, constant query over the (normed) rows, its output projection, then
  ``z + mlp(norm(z))``. The query is constant, so the tangent of the attention needs only the key and
  value tangents of each row.

Shapes as in :mod:`attribution.tail`: ``M`` items, ``C`` tangents, ``S`` rows, ``W`` width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from attribution.tail import LayerNormWeights, layer_norm_tangent, mlp_tangent, split_heads


def _normed(norm: LayerNormWeights | None, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    return (x, dx) if norm is None else (norm(x), layer_norm_tangent(norm, x, dx))


@dataclass(frozen=True)
class MeanPool:
    """The mean of ``row_norm(x)`` over the rows from ``start`` on (the rows before are prefix
    tokens the pooling leaves out, e.g. the class token)."""

    start: int
    row_norm: LayerNormWeights | None

    def __call__(self, x: Tensor) -> Tensor:
        rows = x[:, self.start :]
        return (rows if self.row_norm is None else self.row_norm(rows)).mean(dim=1)

    def tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        y, dy = _normed(self.row_norm, x[:, self.start :], dx[:, :, self.start :])
        return y.mean(dim=1), dy.mean(dim=2)


@dataclass(frozen=True)
class LatentPool:
    """timm's ``AttentionPoolLatent`` with one latent query, after ``row_norm`` on every row.

    ``query``: the projected latent split into heads and scaled, (H, d); ``kv``: the key/value
    projection (weight (2W, W), bias); ``proj``: the output projection; ``norm``, ``fc``,
    ``activation``, ``fc_out``: the residual MLP ``z + mlp(norm(z))``.
    """

    start: int
    row_norm: LayerNormWeights | None
    query: Tensor
    kv_weight: Tensor
    kv_bias: Tensor | None
    proj: tuple[Tensor, Tensor | None]
    norm: LayerNormWeights | None
    fc: tuple[Tensor, Tensor | None]
    activation: nn.Module
    fc_out: tuple[Tensor, Tensor | None]

    @property
    def heads(self) -> int:
        return int(self.query.shape[0])

    def _attend(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention probabilities (M, H, S), values (M, H, S, d) and output (M, H, d) of rows y."""
        k, v = F.linear(y, self.kv_weight, self.kv_bias).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        probs = (k @ self.query.unsqueeze(-1)).squeeze(-1).softmax(dim=-1)
        return probs, v, (probs.unsqueeze(-2) @ v).squeeze(-2)

    def _residual_mlp(self, z: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
        out, d_out = mlp_tangent(
            self.norm, self.fc, self.activation, self.fc_out, z.unsqueeze(1), dz.unsqueeze(2)
        )
        return z + out.squeeze(1), dz + d_out.squeeze(2)

    def __call__(self, x: Tensor) -> Tensor:
        rows = x[:, self.start :]
        _, _, out = self._attend(rows if self.row_norm is None else self.row_norm(rows))
        z = F.linear(out.flatten(1), *self.proj)
        hidden = self.activation(F.linear(z if self.norm is None else self.norm(z), *self.fc))
        return z + F.linear(hidden, *self.fc_out)

    def tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        y, dy = _normed(self.row_norm, x[:, self.start :], dx[:, :, self.start :])
        probs, v, out = self._attend(y)
        dk, dv = F.linear(dy, self.kv_weight).chunk(2, dim=-1)
        dk, dv = split_heads(dk, self.heads), split_heads(dv, self.heads)  # (M, C, H, S, d)
        d_logits = (dk @ self.query.unsqueeze(-1)).squeeze(-1)  # (M, C, H, S)
        p = probs.unsqueeze(1)
        d_probs = p * (d_logits - (p * d_logits).sum(-1, keepdim=True))
        d_out = (d_probs.unsqueeze(-2) @ v.unsqueeze(1)).squeeze(-2) + (p.unsqueeze(-2) @ dv).squeeze(-2)
        z = F.linear(out.flatten(1), *self.proj)
        dz = F.linear(d_out.flatten(2), self.proj[0])
        return self._residual_mlp(z, dz)
