"""The transformer above the hooked layer ("the tail"), as plain functions with tangents.

The engine differentiates the pooled embedding with respect to the hidden states that enter one block.
Everything below is written as batched functions of explicit weights so that forward-mode AD
(``torch.func.jvp``) and reverse-mode AD both work, in any floating dtype, without touching the
open_clip modules (whose fused attention kernels lack forward-mode AD on the CPU).

The closed forms used for the first block above the cut are derived in ``docs/method.md``.

Shapes: ``M`` batch (items × interpolation points), ``S`` tokens, ``W`` width, ``H`` heads,
``E`` embedding size, ``C`` tangents per point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp


@dataclass(frozen=True)
class LayerNormWeights:
    weight: Tensor
    bias: Tensor | None
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
        q, k, v = _qkv(self, self.ln_1(x))
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def scale_1(self, x: Tensor) -> Tensor:
        return x if self.ls_1 is None else x * self.ls_1

    def scale_2(self, x: Tensor) -> Tensor:
        return x if self.ls_2 is None else x * self.ls_2

    def mlp(self, x: Tensor) -> Tensor:
        hidden = self.activation(F.linear(self.ln_2(x), self.fc_weight, self.fc_bias))
        return F.linear(hidden, self.proj_weight, self.proj_bias)


@dataclass(frozen=True)
class Head:
    """Layer norm (if any) and projection from the pooled vector to the embedding."""

    ln: LayerNormWeights | None
    projection: Tensor  # (W, E)
    projection_bias: Tensor | None

    def __call__(self, pooled: Tensor) -> Tensor:
        out = (pooled if self.ln is None else self.ln(pooled)) @ self.projection
        return out if self.projection_bias is None else out + self.projection_bias


class Pooling(Protocol):
    """A pooling that reads every row of the last block's output (mean, attention pooling; see
    :mod:`attribution.pooling`): the last block then runs on all rows, and the pooling's own tangent
    follows it."""

    def __call__(self, x: Tensor) -> Tensor:
        """Rows (M, S, W) → pooled (M, W)."""
        ...

    def tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (M, S, W) and tangents (M, C, S, W) → pooled (M, W) and its tangents (M, C, W)."""
        ...


@dataclass(frozen=True)
class Tail:
    """Blocks ``layer … last`` of one tower plus its pooling and head; ``mask`` is the additive
    attention mask. ``pooling`` ``None``: the embedding reads one row per item (class token, EOT,
    EOS, last), given as ``pool`` to the functions below, and the last block runs on that row only."""

    blocks: tuple[BlockWeights, ...]
    head: Head
    mask: Tensor | None  # (S_max, S_max) additive, or None
    pooling: Pooling | None = None

    @property
    def dense(self) -> bool:
        """Whether some block runs on all rows (not only on the pooled one)."""
        return len(self.blocks) > 1 or self.pooling is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.head.projection.dtype


def _cast(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=dtype)


def _cast_required(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=dtype)


def layer_norm_weights(ln: nn.LayerNorm, dtype: torch.dtype, device: torch.device) -> LayerNormWeights:
    return LayerNormWeights(_cast_required(ln.weight, dtype, device), _cast(ln.bias, dtype, device), ln.eps)


def block_weights(block: Any, dtype: torch.dtype, device: torch.device) -> BlockWeights:
    """Extract the weights of an open_clip ``ResidualAttentionBlock`` (untyped, hence ``Any``)."""
    attn = block.attn

    def gamma(ls: Any) -> Tensor | None:
        return _cast(ls.gamma, dtype, device) if hasattr(ls, "gamma") else None

    return BlockWeights(
        ln_1=layer_norm_weights(block.ln_1, dtype, device),
        in_proj_weight=_cast_required(attn.in_proj_weight, dtype, device),
        in_proj_bias=_cast(attn.in_proj_bias, dtype, device),
        out_proj_weight=_cast_required(attn.out_proj.weight, dtype, device),
        out_proj_bias=_cast(attn.out_proj.bias, dtype, device),
        ls_1=gamma(block.ls_1),
        ln_2=layer_norm_weights(block.ln_2, dtype, device),
        fc_weight=_cast_required(block.mlp.c_fc.weight, dtype, device),
        fc_bias=_cast(block.mlp.c_fc.bias, dtype, device),
        activation=block.mlp.gelu,
        proj_weight=_cast_required(block.mlp.c_proj.weight, dtype, device),
        proj_bias=_cast(block.mlp.c_proj.bias, dtype, device),
        ls_2=gamma(block.ls_2),
        heads=attn.num_heads,
    )


def _qkv(block: BlockWeights, a: Tensor, with_bias: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    bias = block.in_proj_bias if with_bias else None
    q, k, v = F.linear(a, block.in_proj_weight, bias).chunk(3, dim=-1)
    return q, k, v


def split_heads(t: Tensor, heads: int) -> Tensor:
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
    """The embedding from hidden states entering the tail: x (M, S, W), pool (M,) → (M, E)
    (``pool`` is read only by a tail without its own pooling)."""
    if tail.pooling is not None:
        for block in tail.blocks:
            x = block_forward(block, x, tail.mask)
        return tail.head(tail.pooling(x))
    for block in tail.blocks[:-1]:
        x = block_forward(block, x, tail.mask)
    return tail.head(pooled_block_forward(tail.blocks[-1], x, pool, tail.mask))


def layer_norm_tangent(ln: LayerNormWeights, x: Tensor, dx: Tensor) -> Tensor:
    """The tangent of ``ln`` at ``x`` (M, R, W) for tangents ``dx`` (M, C, R, W) sharing that primal.

    Statistics in float32: they decide the accuracy of the whole tangent in reduced precision.
    """
    xf = x.float().unsqueeze(1)
    centred = xf - xf.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    normed = centred * inv_std
    dxc = dx.float() - dx.float().mean(-1, keepdim=True)
    tangent = (dxc - normed * (normed * dxc).mean(-1, keepdim=True)) * inv_std
    return (tangent * ln.weight.float()).to(dx.dtype)


def mlp_tangent(
    ln: LayerNormWeights | None,
    fc: tuple[Tensor, Tensor | None],
    activation: nn.Module,
    proj: tuple[Tensor, Tensor | None],
    y: Tensor,
    dy: Tensor,
) -> tuple[Tensor, Tensor]:
    """``proj(activation(fc(ln(y))))`` on rows y (M, R, W) and its tangents for dy (M, C, R, W); the
    primal runs once. ``fc`` and ``proj``: (weight, bias); ``ln`` ``None``: no norm."""
    h = F.linear(y if ln is None else ln(y), fc[0], fc[1])
    dh = F.linear(dy if ln is None else layer_norm_tangent(ln, y, dy), fc[0])
    # elementwise: the derivative; without has_aux, jvp returns exactly (output, tangent)
    activated, slope = cast(tuple[Tensor, Tensor], jvp(activation, (h,), (torch.ones_like(h),)))
    return F.linear(activated, proj[0], proj[1]), F.linear(dh * slope.unsqueeze(1), proj[0])


def _mlp_tangent(block: BlockWeights, y: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """The block's MLP half on rows y (M, R, W) and tangents dy (M, C, R, W): the primal runs once."""
    fc, proj = (block.fc_weight, block.fc_bias), (block.proj_weight, block.proj_bias)
    out, d_out = mlp_tangent(block.ln_2, fc, block.activation, proj, y, dy)
    return y + block.scale_2(out), dy + block.scale_2(d_out)


def _head_tangent(head: Head, pooled: Tensor, d_pooled: Tensor) -> Tensor:
    """Tangent of the embedding for the pooled row (M, W) and its tangents (M, C, W) → (M, C, E)."""
    if head.ln is None:
        return d_pooled @ head.projection
    normed = layer_norm_tangent(head.ln, pooled.unsqueeze(1), d_pooled.unsqueeze(2)).squeeze(2)
    return normed @ head.projection


def _split_qkv_weights(block: BlockWeights) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = block.in_proj_weight.chunk(3)
    return q, k, v


def _split_qkv_biases(block: BlockWeights) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if block.in_proj_bias is None:
        return None, None, None
    q, k, v = block.in_proj_bias.chunk(3)
    return q, k, v


def single_token_block(
    block: BlockWeights, x: Tensor, delta: Tensor, mask: Tensor | None, rows: Tensor, tokens: range
) -> tuple[Tensor, Tensor]:
    """One block for tangents that are each ``delta`` restricted to one token, in closed form.

    A tangent on token ``s`` moves query row ``r`` only through key and value ``s`` (and through the
    query when ``r == s``): with attention weights ``P`` and output ``o_r``, the output of row ``r``
    moves by ``P[r,s]·(c[r,s]·(v_s − o_r) + dv_s)``, ``c[r,s]`` the logit change, plus for ``r == s``
    the query term ``Σ_j P[r,j]·g[j]·(v_j − o_r)``. That costs O(S·W) per tangent and row, against a
    full block per tangent.

    x, delta: (M, S, W); rows: (M, R) the query rows to keep; tokens: the tangent tokens. Returns the
    block's output on the kept rows (M, R, W) and each tangent's change of it (M, C, R, W).
    """
    m, s, w = x.shape
    heads = block.heads
    c_tokens = torch.arange(tokens.start, tokens.stop, device=x.device)
    wq, wk, wv = _split_qkv_weights(block)
    bq, bk, bv = _split_qkv_biases(block)
    a = block.ln_1(x)
    da = layer_norm_tangent(block.ln_1, x, delta.unsqueeze(1)).squeeze(1)  # row s: tangent s's change
    row_index = rows.unsqueeze(-1).expand(-1, -1, w)
    a_rows, da_rows = a.gather(1, row_index), da.gather(1, row_index)
    q = split_heads(F.linear(a_rows, wq, bq), heads)  # (M, H, R, d)
    k, v = split_heads(F.linear(a, wk, bk), heads), split_heads(F.linear(a, wv, bv), heads)
    da_c = da[:, c_tokens]
    dk, dv = split_heads(F.linear(da_c, wk), heads), split_heads(F.linear(da_c, wv), heads)  # (M,H,C,d)
    dq_rows = split_heads(F.linear(da_rows, wq), heads)  # the query change of tangent rows[r]
    scale = q.shape[-1] ** -0.5

    logits = (q * scale) @ k.transpose(-1, -2)  # (M, H, R, S)
    if mask is not None:
        logits = logits + mask[rows][..., :s].unsqueeze(1)
    probs = logits.softmax(dim=-1)
    out = probs @ v  # (M, H, R, d)

    p_c = probs[..., c_tokens].transpose(-1, -2)  # (M, H, C, R)
    key_change = ((dk * scale) @ q.transpose(-1, -2)) * p_c  # P[r,s]·c[r,s], (M, H, C, R)
    d_out = key_change.unsqueeze(-1) * (v[:, :, c_tokens].unsqueeze(-2) - out.unsqueeze(2)) + p_c.unsqueeze(
        -1
    ) * dv.unsqueeze(-2)  # (M, H, C, R, d)
    # Tangent rows[r] also moves query r: every logit of row r changes.
    weighted = probs * ((dq_rows * scale) @ k.transpose(-1, -2))  # (M, H, R, S)
    query_term = weighted @ v - weighted.sum(-1, keepdim=True) * out  # (M, H, R, d)
    own = rows - tokens.start
    inside = ((own >= 0) & (own < len(tokens))).to(x.dtype)  # (M, R)
    own = own.clamp(0, len(tokens) - 1)
    d_out.scatter_add_(
        2,
        own.view(m, 1, 1, -1, 1).expand(-1, heads, 1, -1, q.shape[-1]),
        (query_term * inside.view(m, 1, -1, 1)).unsqueeze(2),
    )

    y = x.gather(1, row_index) + block.scale_1(
        F.linear(_merge_heads(out), block.out_proj_weight, block.out_proj_bias)
    )
    dy = block.scale_1(F.linear(d_out.permute(0, 2, 3, 1, 4).flatten(3), block.out_proj_weight))
    # The residual carries tangent rows[r] on row r itself.
    residual = (delta.gather(1, row_index) * inside.unsqueeze(-1)).unsqueeze(1)  # (M, 1, R, W)
    dy.scatter_add_(1, own.view(m, 1, -1, 1).expand(-1, 1, -1, w), residual)
    return _mlp_tangent(block, y, dy)


def block_tangent(block: BlockWeights, x: Tensor, dx: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """One full block on x (M, S, W) with dense tangents dx (M, C, S, W); the primal runs once."""
    heads = block.heads
    q, k, v = block.attention_input(x)  # (M, H, S, d)
    dq, dk, dv = (split_heads(t, heads) for t in _qkv(block, layer_norm_tangent(block.ln_1, x, dx), False))
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask[: x.shape[-2], : x.shape[-2]]
    probs = logits.softmax(dim=-1)  # (M, H, S, S)
    out = probs @ v
    q, k, probs, out, v = (t.unsqueeze(1) for t in (q, k, probs, out, v))
    d_logits = ((dq @ k.transpose(-1, -2)) + (q @ dk.transpose(-1, -2))) * scale
    d_probs = probs * (d_logits - (probs * d_logits).sum(-1, keepdim=True))
    d_out = d_probs @ v + probs @ dv  # (M, C, H, S, d)
    y = x + block.scale_1(F.linear(_merge_heads(out.squeeze(1)), block.out_proj_weight, block.out_proj_bias))
    dy = dx + block.scale_1(F.linear(_merge_heads(d_out), block.out_proj_weight))
    return _mlp_tangent(block, y, dy)


def pooled_block_tangent(
    block: BlockWeights, x: Tensor, dx: Tensor, pool: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The last block on the pooled row only, with dense tangents: → (M, W) and (M, C, W)."""
    m, s, w = x.shape
    heads = block.heads
    wq, wk, wv = _split_qkv_weights(block)
    bq, bk, bv = _split_qkv_biases(block)
    a, da = block.ln_1(x), layer_norm_tangent(block.ln_1, x, dx)
    a_row = _gather_rows(a, pool)  # (M, W)
    da_row = da.gather(2, pool.view(m, 1, 1, 1).expand(-1, da.shape[1], 1, w)).squeeze(2)  # (M, C, W)
    q = split_heads(F.linear(a_row, wq, bq).unsqueeze(1), heads)  # (M, H, 1, d)
    k, v = split_heads(F.linear(a, wk, bk), heads), split_heads(F.linear(a, wv, bv), heads)
    dq = split_heads(F.linear(da_row, wq).unsqueeze(2), heads)  # (M, C, H, 1, d)
    dk, dv = split_heads(F.linear(da, wk), heads), split_heads(F.linear(da, wv), heads)  # (M, C, H, S, d)
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-1, -2)  # (M, H, 1, S)
    if mask is not None:
        logits = logits + mask[pool, :s].view(m, 1, 1, s)
    probs = logits.softmax(dim=-1)
    out = probs @ v  # (M, H, 1, d)
    q, k, probs, v = (t.unsqueeze(1) for t in (q, k, probs, v))
    d_logits = ((dq @ k.transpose(-1, -2)) + (q @ dk.transpose(-1, -2))) * scale  # (M, C, H, 1, S)
    d_probs = probs * (d_logits - (probs * d_logits).sum(-1, keepdim=True))
    d_out = (d_probs @ v + probs @ dv).flatten(2)  # (M, C, W)
    x_row = _gather_rows(x, pool)
    dx_row = dx.gather(2, pool.view(m, 1, 1, 1).expand(-1, dx.shape[1], 1, w)).squeeze(2)
    y = x_row + block.scale_1(F.linear(out.flatten(1), block.out_proj_weight, block.out_proj_bias))
    dy = dx_row + block.scale_1(F.linear(d_out, block.out_proj_weight))
    y, dy = _mlp_tangent(block, y.unsqueeze(1), dy.unsqueeze(2))
    return y.squeeze(1), dy.squeeze(2)


def token_jvps(tail: Tail, x: Tensor, delta: Tensor, pool: Tensor, max_tangents: int) -> Tensor:
    """Per-token directional derivatives of the embedding, forward mode, for any tail.

    For every row ``s`` the tangent is ``delta`` restricted to row ``s``. The first block of the tail
    is done in closed form (:func:`single_token_block`): for a one-block tail pooled on one row, on
    that row only, otherwise on every row, after which the tangents are dense and go through the
    remaining blocks batched, each block's primal computed once for all of them, then through the
    last block on the pooled row only, or on all rows and the tail's pooling. ``max_tangents`` bounds
    the tangent rows (points × tangents × rows) held at once.

    x, delta: (M, S, W); pool: (M,). Returns (M, S, E).
    """
    m, s, _ = x.shape
    first, *rest = tail.blocks
    rows_per_tangent = s if tail.dense else 1
    per_point = s * rows_per_tangent
    points = max(1, max_tangents // per_point)
    tokens = s if per_point <= max_tangents else max(1, max_tangents // rows_per_tangent)
    out = torch.empty(m, s, tail.head.projection.shape[1], dtype=x.dtype, device=x.device)
    for p0 in range(0, m, points):
        xp, dp, pp = x[p0 : p0 + points], delta[p0 : p0 + points], pool[p0 : p0 + points]
        all_rows = torch.arange(s, device=x.device).expand(len(xp), s)
        rows = all_rows if tail.dense else pp.view(-1, 1)
        for t0 in range(0, s, tokens):
            chunk = range(t0, min(t0 + tokens, s))
            h, dh = single_token_block(first, xp, dp, tail.mask, rows, chunk)
            if tail.pooling is not None:
                for block in rest:
                    h, dh = block_tangent(block, h, dh, tail.mask)
                h, dh = tail.pooling.tangent(h, dh)
            elif rest:
                for block in rest[:-1]:
                    h, dh = block_tangent(block, h, dh, tail.mask)
                h, dh = pooled_block_tangent(rest[-1], h, dh, pp, tail.mask)
            else:
                h, dh = h.squeeze(1), dh.squeeze(2)
            out[p0 : p0 + points, t0 : chunk.stop] = _head_tangent(tail.head, h, dh)
    return out


def dense_token_vjps(
    tail: Tail, x: Tensor, delta: Tensor, pool: Tensor, chunk: int, cotangents: Tensor | None = None
) -> Tensor:
    """The same derivatives as :func:`token_jvps`, reverse mode: one pass per embedding axis.

    Cheaper when the embedding is smaller than the number of tokens. With ``cotangents`` (K, E), the
    derivatives are contracted with them instead of the axes, one pass per cotangent: row ``k`` gives
    ``cotangents[k] · ∂embedding/∂x[s] · delta[s]`` for every token ``s``. ``chunk`` cotangents per
    pass. Returns (M, S, E), or (M, S, K) with cotangents.
    """
    with torch.enable_grad():
        h = x.detach().requires_grad_(True)
        embedding = embed(tail, h, pool)
        e = embedding.shape[-1]
        rows = torch.eye(e, dtype=x.dtype, device=x.device) if cotangents is None else cotangents.to(x.dtype)
        out = []
        for start in range(0, len(rows), chunk):
            axes = rows[start : start + chunk]  # (K, E)
            batched = axes.unsqueeze(1).expand(len(axes), *embedding.shape)
            (grads,) = torch.autograd.grad(embedding, h, batched, retain_graph=True, is_grads_batched=True)
            out.append((grads * delta).sum(-1))  # (K, M, S)
    return torch.cat(out, dim=0).permute(1, 2, 0)


def pooled_token_vjps(
    tail: Tail, x: Tensor, delta: Tensor, chunk: int, cotangents: Tensor | None = None
) -> Tensor:
    """:func:`dense_token_vjps` for a tail with a pooling that reads every row, cheaper.

    Reverse mode runs only from the output of the first block's attention (``z``) up: the MLP half,
    the blocks above and the pooling. The first block's attention is then contracted in closed form,
    the transpose of :func:`single_token_block`: with ``ĝ_r`` the cotangent of ``z_r`` taken back
    through the output projection and split into heads, the derivative along ``delta`` on token
    ``s`` is ``g_s·δ_s + Σ_h Σ_r P[r,s]·(c[r,s]·(ĝ_r·v_s − ĝ_r·o_r) + ĝ_r·dv_s)`` plus, for the
    query of row ``s``, ``Σ_h Σ_j P[s,j]·g[s,j]·(ĝ_s·v_j − ĝ_s·o_s)``: products of (S, S) matrices
    per head, no pass of the attention per cotangent.

    x, delta: (M, S, W). Returns (M, S, E), or (M, S, K) with cotangents (K, E).
    """
    first, *rest = tail.blocks
    assert tail.pooling is not None
    heads = first.heads
    wq, wk, wv = _split_qkv_weights(first)
    bq, bk, bv = _split_qkv_biases(first)
    a = first.ln_1(x)
    q, k, v = (split_heads(F.linear(a, w_, b_), heads) for w_, b_ in ((wq, bq), (wk, bk), (wv, bv)))
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-1, -2)
    if tail.mask is not None:
        logits = logits + tail.mask[: x.shape[-2], : x.shape[-2]]
    probs = logits.softmax(dim=-1)  # (M, H, S, S)
    out = probs @ v  # (M, H, S, d)
    z = x + first.scale_1(F.linear(_merge_heads(out), first.out_proj_weight, first.out_proj_bias))
    da = layer_norm_tangent(first.ln_1, x, delta.unsqueeze(1)).squeeze(1)  # row s: tangent s's change
    dq, dk, dv = (split_heads(F.linear(da, w_), heads) for w_ in (wq, wk, wv))
    # Key changes weighted by attention, (M, H, s, r): P[r,s]·c[r,s], transposed for products over r.
    key_weights = (probs * ((q * scale) @ dk.transpose(-1, -2))).transpose(-1, -2)
    probs_t = probs.transpose(-1, -2)
    # Query of row s: Σ_j P[s,j]·g[s,j]·(v_j − o_s) = moved_values[s] − moved_mass[s]·o_s, any cotangent.
    query_weights = probs * ((dq * scale) @ k.transpose(-1, -2))  # (M, H, s, j)
    moved_values, moved_mass = query_weights @ v, query_weights.sum(-1)  # (M, H, s, d), (M, H, s)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = zz + first.scale_2(first.mlp(zz))
        for block in rest:
            y = block_forward(block, y, tail.mask)
        embedding = tail.head(tail.pooling(y))
        e = embedding.shape[-1]
        rows = torch.eye(e, dtype=x.dtype, device=x.device) if cotangents is None else cotangents.to(x.dtype)
        out_rows = []
        for start in range(0, len(rows), chunk):
            axes = rows[start : start + chunk]  # (K, E)
            batched = axes.unsqueeze(1).expand(len(axes), *embedding.shape)
            (g,) = torch.autograd.grad(embedding, zz, batched, retain_graph=True, is_grads_batched=True)
            residual = (g * delta).sum(-1)  # (K, M, S)
            g_hat = split_heads(first.scale_1(g) @ first.out_proj_weight, heads)  # (K, M, H, S, d)
            g_o = (g_hat * out).sum(-1)  # (K, M, H, r): ĝ_r·o_r
            # Σ_r P[r,s]·c[r,s]·(ĝ_r·v_s − ĝ_r·o_r) + Σ_r P[r,s]·ĝ_r·dv_s, as products over r
            keys = ((key_weights @ g_hat) * v).sum(-1) - (key_weights @ g_o.unsqueeze(-1)).squeeze(-1)
            values = ((probs_t @ g_hat) * dv).sum(-1)
            query = (g_hat * moved_values).sum(-1) - g_o * moved_mass
            out_rows.append(residual + (keys + values + query).sum(dim=2))
    return torch.cat(out_rows, dim=0).permute(1, 2, 0)
