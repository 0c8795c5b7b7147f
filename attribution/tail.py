"""The transformer above the hooked layer ("the tail"), as plain functions with tangents.

The engine differentiates the pooled embedding with respect to the hidden states that enter one block.
Everything below is written as batched functions of explicit weights so that forward-mode AD
(``torch.func.jvp``) and reverse-mode AD both work, in any floating dtype, without touching the
open_clip modules (whose fused attention kernels lack forward-mode AD on the CPU).

Shapes: ``M`` batch (items × interpolation points), ``S`` tokens, ``W`` width, ``H`` heads,
``E`` embedding size, ``C`` tangents per point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp


@dataclass(frozen=True)
class LayerNormWeights:
    weight: Tensor
    bias: Tensor
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class BlockWeights:
    """The parameters of one open_clip ``ResidualAttentionBlock``, cast to one dtype and device."""

    ln_1: LayerNormWeights
    in_proj_weight: Tensor
    in_proj_bias: Tensor | None
    out_proj_weight: Tensor
    out_proj_bias: Tensor | None
    ls_1: Tensor | None  # LayerScale gamma, or None for identity
    ln_2: LayerNormWeights
    fc_weight: Tensor
    fc_bias: Tensor | None
    activation: nn.Module
    proj_weight: Tensor
    proj_bias: Tensor | None
    ls_2: Tensor | None
    heads: int

    def attention_input(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value of ``x`` (..., S, W), each split into heads (..., H, S, d)."""
        return tuple(_split_heads(t, self.heads) for t in _qkv(self, self.ln_1(x)))

    def scale_1(self, x: Tensor) -> Tensor:
        return x if self.ls_1 is None else x * self.ls_1

    def scale_2(self, x: Tensor) -> Tensor:
        return x if self.ls_2 is None else x * self.ls_2

    def mlp(self, x: Tensor) -> Tensor:
        hidden = self.activation(F.linear(self.ln_2(x), self.fc_weight, self.fc_bias))
        return F.linear(hidden, self.proj_weight, self.proj_bias)


@dataclass(frozen=True)
class Head:
    """Final layer norm and projection from the pooled row to the embedding."""

    ln: LayerNormWeights
    projection: Tensor  # (W, E)
    projection_bias: Tensor | None

    def __call__(self, pooled: Tensor) -> Tensor:
        out = self.ln(pooled) @ self.projection
        return out if self.projection_bias is None else out + self.projection_bias


@dataclass(frozen=True)
class Tail:
    """Blocks ``layer … last`` of one tower plus its head; ``mask`` is the additive attention mask."""

    blocks: tuple[BlockWeights, ...]
    head: Head
    mask: Tensor | None  # (S_max, S_max) additive, or None

    @property
    def dtype(self) -> torch.dtype:
        return self.head.projection.dtype


def _cast(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=dtype)


def layer_norm_weights(ln: nn.LayerNorm, dtype: torch.dtype, device: torch.device) -> LayerNormWeights:
    return LayerNormWeights(_cast(ln.weight, dtype, device), _cast(ln.bias, dtype, device), ln.eps)


def block_weights(block: nn.Module, dtype: torch.dtype, device: torch.device) -> BlockWeights:
    """Extract the weights of an open_clip ``ResidualAttentionBlock``."""
    attn = block.attn

    def gamma(ls: nn.Module) -> Tensor | None:
        return _cast(ls.gamma, dtype, device) if hasattr(ls, "gamma") else None

    return BlockWeights(
        ln_1=layer_norm_weights(block.ln_1, dtype, device),
        in_proj_weight=_cast(attn.in_proj_weight, dtype, device),
        in_proj_bias=_cast(attn.in_proj_bias, dtype, device),
        out_proj_weight=_cast(attn.out_proj.weight, dtype, device),
        out_proj_bias=_cast(attn.out_proj.bias, dtype, device),
        ls_1=gamma(block.ls_1),
        ln_2=layer_norm_weights(block.ln_2, dtype, device),
        fc_weight=_cast(block.mlp.c_fc.weight, dtype, device),
        fc_bias=_cast(block.mlp.c_fc.bias, dtype, device),
        activation=block.mlp.gelu,
        proj_weight=_cast(block.mlp.c_proj.weight, dtype, device),
        proj_bias=_cast(block.mlp.c_proj.bias, dtype, device),
        ls_2=gamma(block.ls_2),
        heads=attn.num_heads,
    )


def _qkv(block: BlockWeights, a: Tensor, with_bias: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    bias = block.in_proj_bias if with_bias else None
    return F.linear(a, block.in_proj_weight, bias).chunk(3, dim=-1)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    *lead, s, w = t.shape
    return t.reshape(*lead, s, heads, w // heads).transpose(-3, -2)


def _merge_heads(t: Tensor) -> Tensor:
    *lead, h, s, d = t.shape
    return t.transpose(-3, -2).reshape(*lead, s, h * d)


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[m, ..., index[m], :]`` for t of shape (M, ..., S, D) → (M, ..., D)."""
    shape = (t.shape[0],) + (1,) * (t.dim() - 2) + (1,)
    idx = index.view(shape[:-1] + (1,)).expand(*t.shape[:-2], 1, t.shape[-1])
    return t.gather(-2, idx).squeeze(-2)


def block_forward(block: BlockWeights, x: Tensor, mask: Tensor | None) -> Tensor:
    """One full block on all rows: x (M, S, W) → (M, S, W)."""
    q, k, v = block.attention_input(x)
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask[: x.shape[-2], : x.shape[-2]]
    attended = _merge_heads(logits.softmax(dim=-1) @ v)
    x = x + block.scale_1(F.linear(attended, block.out_proj_weight, block.out_proj_bias))
    return x + block.scale_2(block.mlp(x))


def pooled_block_forward(block: BlockWeights, x: Tensor, pool: Tensor, mask: Tensor | None) -> Tensor:
    """The last block on the pooled row only: keys/values from all rows, x (M, S, W) → (M, W)."""
    q, k, v = block.attention_input(x)
    scale = q.shape[-1] ** -0.5
    q_row = _gather_rows(q, pool)  # (M, H, d)
    logits = torch.einsum("mhd,mhsd->mhs", q_row * scale, k)
    if mask is not None:
        logits = logits + mask[pool, : x.shape[-2]].unsqueeze(1)
    attended = torch.einsum("mhs,mhsd->mhd", logits.softmax(dim=-1), v).flatten(1)
    y = _gather_rows(x, pool) + block.scale_1(F.linear(attended, block.out_proj_weight, block.out_proj_bias))
    return y + block.scale_2(block.mlp(y))


def embed(tail: Tail, x: Tensor, pool: Tensor) -> Tensor:
    """The embedding from hidden states entering the tail: x (M, S, W), pool (M,) → (M, E)."""
    for block in tail.blocks[:-1]:
        x = block_forward(block, x, tail.mask)
    return tail.head(pooled_block_forward(tail.blocks[-1], x, pool, tail.mask))


def last_block_token_jvps(tail: Tail, x: Tensor, delta: Tensor, pool: Tensor) -> Tensor:
    """Per-token directional derivatives of the embedding when the tail is the last block alone.

    For every row ``s`` the tangent is ``delta`` restricted to row ``s``. Such a tangent changes the
    pooled row only through the key and value of row ``s`` (and through its query when ``s`` is the
    pooled row), so the attention derivative has a closed form of cost O(S·W) per point instead of
    a full pass per tangent.

    x, delta: (M, S, W); pool: (M,). Returns (M, S, E).
    """
    (block,) = tail.blocks
    m_index = torch.arange(x.shape[0], device=x.device)
    a, da = jvp(block.ln_1, (x,), (delta,))  # row-wise: row s of da is tangent s's change
    q, k, v = (_split_heads(t, block.heads) for t in _qkv(block, a))
    dq, dk, dv = (_split_heads(t, block.heads) for t in _qkv(block, da, with_bias=False))
    scale = q.shape[-1] ** -0.5
    q_row, dq_row = _gather_rows(q, pool), _gather_rows(dq, pool)  # (M, H, d)

    logits = torch.einsum("mhd,mhsd->mhs", q_row * scale, k)
    if tail.mask is not None:
        logits = logits + tail.mask[pool, : x.shape[-2]].unsqueeze(1)
    probs = logits.softmax(dim=-1)  # (M, H, S)
    out_row = torch.einsum("mhs,mhsd->mhd", probs, v)
    centred_v = v - out_row.unsqueeze(-2)  # (M, H, S, d)

    # Tangent s moves key s (logit change c_s) and value s; softmax couples the logit to all rows.
    key_change = torch.einsum("mhd,mhsd->mhs", q_row * scale, dk)
    d_out = probs.unsqueeze(-1) * (key_change.unsqueeze(-1) * centred_v + dv)  # (M, H, S, d)
    # The pooled row's own tangent also moves the query, changing every logit of that row.
    query_change = torch.einsum("mhd,mhsd->mhs", dq_row * scale, k)
    d_out[m_index, :, pool] += torch.einsum("mhs,mhsd->mhd", probs * query_change, centred_v)

    y = _gather_rows(x, pool) + block.scale_1(
        F.linear(out_row.flatten(1), block.out_proj_weight, block.out_proj_bias)
    )
    dy = block.scale_1(F.linear(_merge_heads(d_out), block.out_proj_weight))
    dy[m_index, pool] += delta[m_index, pool]

    def rest(rows: Tensor) -> Tensor:  # row-wise: MLP half of the block, then the head
        return tail.head(rows + block.scale_2(block.mlp(rows)))

    _, d_embedding = jvp(rest, (y.unsqueeze(1).expand_as(dy).contiguous(),), (dy,))
    return d_embedding


def dense_token_jvps(tail: Tail, x: Tensor, delta: Tensor, pool: Tensor, chunk: int) -> Tensor:
    """Per-token directional derivatives through a tail of several blocks, forward mode.

    x, delta: (M, S, W); pool: (M,). Returns (M, S, E). ``chunk`` tokens share one batched JVP.
    """
    m, s, w = x.shape
    out = []
    for start in range(0, s, chunk):
        rows = torch.arange(start, min(start + chunk, s), device=x.device)
        c = len(rows)
        tangent = torch.zeros(m, c, s, w, dtype=x.dtype, device=x.device)
        tangent[:, torch.arange(c), rows] = delta[:, rows]
        pools = pool.repeat_interleave(c)
        _, d_embedding = jvp(
            lambda h, p=pools: embed(tail, h, p),
            (x.repeat_interleave(c, dim=0),),
            (tangent.reshape(m * c, s, w),),
        )
        out.append(d_embedding.view(m, c, -1))
    return torch.cat(out, dim=1)


def dense_token_vjps(tail: Tail, x: Tensor, delta: Tensor, pool: Tensor, chunk: int) -> Tensor:
    """The same derivatives as :func:`dense_token_jvps`, reverse mode: one pass per embedding axis.

    Cheaper when the embedding is smaller than the number of tokens. Returns (M, S, E).
    """
    with torch.enable_grad():
        h = x.detach().requires_grad_(True)
        embedding = embed(tail, h, pool)
        e = embedding.shape[-1]
        eye = torch.eye(e, dtype=x.dtype, device=x.device)
        out = []
        for start in range(0, e, chunk):
            axes = eye[start : start + chunk]  # (K, E)
            cotangents = axes.unsqueeze(1).expand(len(axes), *embedding.shape)
            (grads,) = torch.autograd.grad(
                embedding, h, cotangents, retain_graph=True, is_grads_batched=True
            )  # (K, M, S, W)
            out.append((grads * delta).sum(-1))
    return torch.cat(out, dim=0).permute(1, 2, 0)
