"""The two encoders of an open_clip model, cut at a chosen block.

Each tower gives the hidden states entering block ``layer`` (for inputs and for the method's
uninformative reference), how the embedding is pooled from them, and the tail above the cut as
explicit weights (see :mod:`attribution.tail` and :mod:`attribution.pooling`).

Supported (everything else is refused with the reason, :class:`UnsupportedModel`):

- text: open_clip's ``TextTransformer`` (``CustomTextCLIP.text``) or the built-in text tower of
  ``CLIP``, causal and pooled on the EOT (``argmax``) or first ``eos_id`` row, or non-causal pooled on
  the ``last`` row (SigLIP, SigLIP 2, CLIPA);
- image: open_clip's ``VisionTransformer`` pooled on the class token (``tok``) or by the mean of the
  patches (``avg``, with or without ``final_ln_after_pool``), and timm's ``VisionTransformer`` as
  open_clip's ``TimmModel`` wraps it, pooled on the class token, by the mean or by attention to a
  learned latent (``map``, SigLIP), with register tokens and LayerScale allowed.

Both need standard pre-norm blocks: one fused-qkv softmax attention without q/k norms, then an MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Mlp as TimmMlp  # open_clip depends on timm
from timm.layers.attention import Attention as TimmAttention
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn

from attribution.errors import InvalidOption, UnsupportedModel
from attribution.pooling import LatentPool, MeanPool
from attribution.tail import (
    BlockWeights,
    Head,
    LayerNormWeights,
    Pooling,
    Tail,
    block_weights,
    layer_norm_weights,
)


def _check_layer(layer: int, n_layers: int, name: str) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise InvalidOption(f"{name} must be an integer block index from 0 to {n_layers - 1}, got {layer!r}")


def _check_open_clip_blocks(blocks: nn.ModuleList, tower: str) -> None:
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            raise UnsupportedModel(
                f"the {tower} tower uses {type(block).__name__} blocks; only open_clip's standard "
                "ResidualAttentionBlock (nn.MultiheadAttention) is supported"
            )
        inner = (getattr(block.attn, "ln_inner", None), getattr(block.mlp, "ln", None))
        if any(m is not None and not isinstance(m, nn.Identity) for m in inner):
            raise UnsupportedModel(f"the {tower} tower's blocks have inner norms (scale_attn/scale_fc)")


def _is_layer_norm(m: Any) -> bool:
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine


def _norm_or_none(m: Any, what: str) -> Any:
    """``m`` if it is an affine LayerNorm, ``None`` if it is the identity; refused otherwise."""
    if isinstance(m, nn.Identity) or m is None:
        return None
    if not _is_layer_norm(m):
        raise UnsupportedModel(f"{what} is a {type(m).__name__}, not a LayerNorm")
    return m


def _ln(m: Any, dtype: torch.dtype, device: torch.device) -> LayerNormWeights | None:
    return None if m is None else layer_norm_weights(m, dtype, device)


def _cast(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=dtype)


def _linear(m: nn.Linear, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
    return m.weight.detach().to(device=device, dtype=dtype), _cast(m.bias, dtype, device)


# ------------------------------------------------------------------------------------------- text

TEXT_POOLINGS = ("argmax", "eos", "last")


class _Blocks:
    """A tower's transformer blocks: how many, and the one check of a requested cut."""

    blocks: nn.ModuleList
    layer_option: str  # the option that names a block of this tower

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> None:
        _check_layer(layer, self.n_layers, self.layer_option)


class TextTower(_Blocks):
    """open_clip's text transformer: the built-in tower of ``CLIP`` or ``CustomTextCLIP.text``.

    Pooling ``argmax`` (causal; CLIP's EOT has the highest id), ``eos`` (causal; the first ``eos_id``
    row) or ``last`` (non-causal; the last context row, a padding row for any caption that fits).
    A causal tower sees nothing after its pooled row, so those rows are cut; a non-causal one sees all
    ``context_length`` rows, padded as the tokenizer pads.
    """

    layer_option = "text_layer"

    def __init__(self, clip: nn.Module) -> None:
        # open_clip is untyped: its submodules come from nn.Module.__getattr__, so treat them as Any.
        model: Any = clip
        text: Any = getattr(model, "text", None)
        if text is not None and all(hasattr(text, a) for a in ("transformer", "token_embedding", "ln_final")):
            self.module: Any = text
            pool_type, eos_id = text.pool_type, getattr(text, "eos_id", None)
            if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
                raise UnsupportedModel("the text tower appends a class token or masks padding (CoCa-style)")
        elif all(hasattr(model, a) for a in ("transformer", "token_embedding", "ln_final")):
            self.module = model
            pool_type, eos_id = (
                getattr(model, "text_pool_type", "argmax"),
                getattr(model, "text_eos_id", None),
            )
        else:
            raise UnsupportedModel(
                f"{type(model).__name__} has no open_clip text transformer (Hugging Face text towers and "
                "CoCa are not supported)"
            )
        if pool_type not in TEXT_POOLINGS:
            raise UnsupportedModel(
                f"text pooling {pool_type!r} is not supported; only {', '.join(TEXT_POOLINGS)}"
            )
        self.causal = self.module.attn_mask is not None
        if self.causal == (pool_type == "last"):
            kind = "causal" if self.causal else "non-causal"
            raise UnsupportedModel(f"a {kind} text tower pooled with {pool_type!r} is not supported")
        _check_open_clip_blocks(self.module.transformer.resblocks, "text")
        self.pool_type: str = pool_type
        if pool_type == "eos" and eos_id is None:
            raise UnsupportedModel("the text tower pools on an end-of-sequence id but names none")
        self.eos_id: int = -1 if eos_id is None else int(eos_id)
        self.blocks: nn.ModuleList = self.module.transformer.resblocks
        self.context_length: int = self.module.positional_embedding.shape[0]

    def mask(self, length: int) -> Tensor | None:
        mask: Tensor | None = self.module.attn_mask
        return None if mask is None else mask[:length, :length]

    def pool_index(self, tokens: Tensor) -> Tensor:
        """The pooled row of each of token ids (B, S) → (B,)."""
        if self.pool_type == "argmax":
            # The EOT id is the largest in CLIP's vocabulary, as both open_clip and the reference assume.
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            first: Tensor = tokens.eq(self.eos_id).int().argmax(dim=-1)  # open_clip: the first EOS
            return first
        return torch.full(tokens.shape[:1], tokens.shape[-1] - 1, dtype=torch.long, device=tokens.device)

    def cut(self, tokens: Tensor) -> Tensor:
        """The rows of ids (S,) that enter the tower's path: up to the pooled row when causal."""
        return tokens[: int(self.pool_index(tokens.unsqueeze(0))[0]) + 1] if self.causal else tokens

    @torch.no_grad()
    def hidden(self, tokens: Tensor, layer: int) -> Tensor:
        """Hidden states entering block ``layer`` for token ids (B, S) → (B, S, W).

        A causal mask lets rows after the pooled one change no kept row, so ids may be cut there; a
        non-causal tower needs its full context.
        """
        cast = self.module.transformer.get_cast_dtype()
        length = tokens.shape[-1]
        if not self.causal and length != self.context_length:
            raise InvalidOption(
                f"a non-causal text tower needs {self.context_length} token ids, got {length}"
            )
        x: Tensor = self.module.token_embedding(tokens).to(cast)
        x = x + self.module.positional_embedding[:length].to(cast)
        mask = self.mask(length)
        for block in self.blocks[:layer]:
            x = block(x, attn_mask=mask)
        return x

    def tail(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tail:
        proj = self.module.text_projection
        if isinstance(proj, nn.Linear):
            projection, bias = proj.weight.detach().T, proj.bias
        elif proj is None:
            projection, bias = torch.eye(self.module.ln_final.normalized_shape[0]), None
        else:
            projection, bias = proj.detach(), None
        mask: Tensor | None = self.module.attn_mask
        return Tail(
            blocks=tuple(block_weights(b, dtype, device) for b in self.blocks[layer:]),
            head=Head(
                layer_norm_weights(self.module.ln_final, dtype, device),
                projection.to(device=device, dtype=dtype),
                None if bias is None else bias.detach().to(device=device, dtype=dtype),
            ),
            mask=None if mask is None else mask.to(device=device, dtype=dtype),
        )


# ------------------------------------------------------------------------------------------ image


# The one text row beside the caption's: the sum over the padding rows a non-causal tower reads.
PADDING_ROW = "padding"


@dataclass(frozen=True)
class RowLayout:
    """Where an image tower's rows come from: named prefix rows (class token, registers), then the
    patches in raster order from ``patch_start``. ``pool_row``: the row the embedding reads when the
    tower pools one row (the class token), else ``None``."""

    extras: dict[str, range]
    patch_start: int
    grid: tuple[int, int]
    pool_row: int | None


class ImageTower(_Blocks):
    """An open_clip ``VisionTransformer`` pooled on the class token or the mean of the patches."""

    layer_option = "image_layer"

    def __init__(self, model: nn.Module) -> None:
        visual: Any = model.visual  # untyped open_clip VisionTransformer
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise UnsupportedModel(
                f"the image tower {type(visual).__name__} is not an open_clip VisionTransformer or a timm "
                "ViT; ResNet and other towers are not supported"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModel("attentional pooling (CoCa) in the image tower is not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModel(
                f"image pooling {visual.pool_type!r} is not supported; only 'tok' and 'avg'"
            )
        _check_open_clip_blocks(visual.transformer.resblocks, "image")
        self.visual: Any = visual
        self.blocks: nn.ModuleList = visual.transformer.resblocks
        gh, gw = visual.grid_size
        tok = visual.pool_type == "tok"
        self.layout = RowLayout({"cls": range(0, 1)}, 1, (int(gh), int(gw)), 0 if tok else None)
        self.patch_size: tuple[int, int] = (int(visual.patch_size[0]), int(visual.patch_size[1]))

    @torch.no_grad()
    def hidden(self, images: Tensor, layer: int) -> Tensor:
        """Hidden states entering block ``layer`` for images (B, 3, H, W) → (B, 1 + patches, W)."""
        x: Tensor = self.visual._embeds(images)
        for block in self.blocks[:layer]:
            x = block(x)
        return x

    def tail(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tail:
        proj = self.visual.proj
        width = self.visual.ln_post.normalized_shape[0]
        projection = (torch.eye(width) if proj is None else proj.detach()).to(device=device, dtype=dtype)
        blocks = tuple(block_weights(b, dtype, device) for b in self.blocks[layer:])
        ln_post = layer_norm_weights(self.visual.ln_post, dtype, device)
        if self.layout.pool_row is not None:
            return Tail(blocks=blocks, head=Head(ln_post, projection, None), mask=None)
        if self.visual.final_ln_after_pool:  # open_clip: the mean, then ln_post
            return Tail(blocks, Head(ln_post, projection, None), None, MeanPool(1, None))
        return Tail(blocks, Head(None, projection, None), None, MeanPool(1, ln_post))


def _timm_block_weights(block: Any, dtype: torch.dtype, device: torch.device) -> BlockWeights:
    """The weights of a timm ``Block`` (checked by :func:`_check_timm_block`)."""
    attn, mlp = block.attn, block.mlp

    def gamma(ls: Any) -> Tensor | None:
        return _cast(ls.gamma, dtype, device) if hasattr(ls, "gamma") else None

    out_w, out_b = _linear(attn.proj, dtype, device)
    fc_w, fc_b = _linear(mlp.fc1, dtype, device)
    proj_w, proj_b = _linear(mlp.fc2, dtype, device)
    in_w, in_b = _linear(attn.qkv, dtype, device)
    return BlockWeights(
        ln_1=layer_norm_weights(block.norm1, dtype, device),
        in_proj_weight=in_w,
        in_proj_bias=in_b,
        out_proj_weight=out_w,
        out_proj_bias=out_b,
        ls_1=gamma(block.ls1),
        ln_2=layer_norm_weights(block.norm2, dtype, device),
        fc_weight=fc_w,
        fc_bias=fc_b,
        activation=mlp.act,
        proj_weight=proj_w,
        proj_bias=proj_b,
        ls_2=gamma(block.ls2),
        heads=attn.num_heads,
    )


def _check_timm_block(block: Any) -> None:
    attn = getattr(block, "attn", None)
    if type(block) is not TimmBlock or type(attn) is not TimmAttention or type(block.mlp) is not TimmMlp:
        raise UnsupportedModel(
            f"the timm image tower uses {type(block).__name__} blocks with {type(attn).__name__}; only "
            "timm's standard pre-norm Block (fused qkv Attention, Mlp) is supported (not rope, EVA or "
            "PE-Core blocks)"
        )
    extras = (attn.q_norm, attn.k_norm, getattr(attn, "norm", None), block.mlp.norm)
    if any(m is not None and not isinstance(m, nn.Identity) for m in extras) or getattr(attn, "gate", None):
        raise UnsupportedModel("the timm blocks have q/k norms, inner norms or gates; only plain attention")
    if attn.num_heads * attn.head_dim != attn.qkv.in_features:
        raise UnsupportedModel("the timm attention's width differs from the block's")
    if not (_is_layer_norm(block.norm1) and _is_layer_norm(block.norm2)):
        raise UnsupportedModel("the timm blocks' norms are not LayerNorms")
    for ls in (block.ls1, block.ls2):
        if not isinstance(ls, nn.Identity) and not hasattr(ls, "gamma"):
            raise UnsupportedModel(f"the timm blocks scale with {type(ls).__name__}, not LayerScale")


def _composed_projection(linears: list[nn.Linear], width: int) -> tuple[Tensor, Tensor | None]:
    """The linear layers after the pooling as one (W, E) matrix and bias, composed in float64."""
    projection = torch.eye(width, dtype=torch.float64)
    bias: Tensor | None = None
    for layer in linears:
        weight = layer.weight.detach().double().cpu()
        projection = projection @ weight.T
        bias = None if bias is None else bias @ weight.T
        if layer.bias is not None:
            b = layer.bias.detach().double().cpu()
            bias = b if bias is None else bias + b
    return projection, bias


class TimmImageTower(_Blocks):
    """A timm ``VisionTransformer`` inside open_clip's ``TimmModel`` (SigLIP, SigLIP 2, timm ViTs)."""

    layer_option = "image_layer"

    def __init__(self, model: nn.Module) -> None:
        visual: Any = model.visual
        trunk: Any = getattr(visual, "trunk", None)
        if type(trunk) is not TimmVisionTransformer:
            raise UnsupportedModel(
                f"the timm image tower {type(trunk).__name__} is not timm's VisionTransformer (EVA, rope, "
                "MobileCLIP and convolutional trunks are not supported)"
            )
        if getattr(trunk, "dynamic_img_size", False) or type(trunk.patch_embed).__name__ != "PatchEmbed":
            raise UnsupportedModel("the timm ViT embeds patches dynamically or with a non-standard embedder")
        for block in trunk.blocks:
            _check_timm_block(block)
        self.visual, self.trunk = visual, trunk
        self.blocks: Any = trunk.blocks  # an nn.Sequential
        prefix = int(trunk.num_prefix_tokens)
        has_cls = trunk.cls_token is not None
        extras = {"cls": range(0, 1)} if has_cls else {}
        if trunk.reg_token is not None:
            extras["registers"] = range(int(has_cls), prefix)
        if getattr(trunk, "has_class_token", has_cls) != has_cls or sum(map(len, extras.values())) != prefix:
            raise UnsupportedModel("the timm ViT has prefix tokens other than a class token and registers")
        self.pooling_start = 0 if getattr(trunk, "pool_include_prefix", False) else prefix
        self.global_pool: str = trunk.global_pool
        if self.global_pool not in ("token", "avg", "map"):
            raise UnsupportedModel(
                f"timm pooling {self.global_pool!r} is not supported; only 'token', 'avg' and 'map'"
            )
        if self.global_pool == "token" and not has_cls:
            raise UnsupportedModel("timm token pooling without a class token")
        if self.global_pool == "map":
            _check_latent_pool(trunk.attn_pool)
        self.norm = _norm_or_none(trunk.norm, "the timm ViT's final norm")
        self.fc_norm = _norm_or_none(trunk.fc_norm, "the timm ViT's pooled norm")
        if self.global_pool == "token" and self.norm is not None and self.fc_norm is not None:
            raise UnsupportedModel("token pooling with both a final norm and a pooled norm")
        self.linears = _head_linears(visual, trunk)
        gh, gw = trunk.patch_embed.grid_size
        ph, pw = trunk.patch_embed.patch_size
        self.patch_size = (int(ph), int(pw))
        pool_row = 0 if self.global_pool == "token" else None
        self.layout = RowLayout(extras, prefix, (int(gh), int(gw)), pool_row)

    @torch.no_grad()
    def hidden(self, images: Tensor, layer: int) -> Tensor:
        """Hidden states entering block ``layer`` for images (B, 3, H, W) → (B, prefix + patches, W)."""
        trunk = self.trunk
        x: Tensor = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
        for block in self.blocks[:layer]:
            x = block(x)
        return x

    def tail(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tail:
        blocks = tuple(_timm_block_weights(b, dtype, device) for b in self.blocks[layer:])
        projection, bias = _composed_projection(self.linears, int(self.trunk.num_features))
        norm, fc_norm = _ln(self.norm, dtype, device), _ln(self.fc_norm, dtype, device)
        cast = (projection.to(device=device, dtype=dtype), _cast(bias, dtype, device))
        if self.global_pool == "token":  # a norm on every row, then the class row: one norm of that row
            return Tail(blocks, Head(norm or fc_norm, *cast), None)
        pooling: Pooling
        if self.global_pool == "avg":
            pooling = MeanPool(self.pooling_start, norm)
        else:
            pooling = _latent_pool(self.trunk.attn_pool, self.pooling_start, norm, dtype, device)
        return Tail(blocks, Head(fc_norm, *cast), None, pooling)


def _check_latent_pool(pool: Any) -> None:
    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModel(f"timm 'map' pooling by {type(pool).__name__} is not supported")
    plain = all(isinstance(m, nn.Identity) for m in (pool.q_norm, pool.k_norm))
    if pool.latent_len != 1 or pool.pos_embed is not None or not plain or pool.mlp is None:
        raise UnsupportedModel(
            "timm attention pooling with several latents, a position embedding, q/k norms or no MLP"
        )
    if type(pool.mlp) is not TimmMlp or not isinstance(pool.mlp.norm, nn.Identity):
        raise UnsupportedModel("timm attention pooling with a non-standard MLP")
    _norm_or_none(pool.norm, "the attention pooling's norm")


def _latent_pool(
    pool: Any, start: int, row_norm: LayerNormWeights | None, dtype: torch.dtype, device: torch.device
) -> LatentPool:
    with torch.no_grad():
        query = pool.q(pool.latent)[0, 0].double().cpu()  # (W,): the latent query is a constant
    heads = int(pool.num_heads)
    query = query.view(heads, -1) * float(pool.scale)
    kv_weight, kv_bias = _linear(pool.kv, dtype, device)
    return LatentPool(
        start=start,
        row_norm=row_norm,
        query=query.to(device=device, dtype=dtype),
        kv_weight=kv_weight,
        kv_bias=kv_bias,
        proj=_linear(pool.proj, dtype, device),
        norm=_ln(_norm_or_none(pool.norm, "the attention pooling's norm"), dtype, device),
        fc=_linear(pool.mlp.fc1, dtype, device),
        activation=pool.mlp.act,
        fc_out=_linear(pool.mlp.fc2, dtype, device),
    )


def _head_linears(visual: Any, trunk: Any) -> list[nn.Linear]:
    """The linear layers from the pooled vector to the embedding: timm's head, then open_clip's."""
    linears: list[nn.Linear] = []
    for name, module in [("head", trunk.head), *visual.head.named_children()]:
        if isinstance(module, nn.Linear):
            linears.append(module)
        elif not isinstance(module, (nn.Identity, nn.Dropout)):
            raise UnsupportedModel(
                f"the timm tower's projection {name!r} is a {type(module).__name__}, not linear"
            )
    return linears


# ----------------------------------------------------------------------------------------- choose

AnyImageTower = ImageTower | TimmImageTower


def image_tower(model: nn.Module) -> AnyImageTower:
    """The image tower of an open_clip model: open_clip's ViT or a timm ViT; refused otherwise."""
    visual: Any = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "trunk"):
        return TimmImageTower(model)
    return ImageTower(model)


def text_tower(model: nn.Module) -> TextTower:
    """The text tower of an open_clip model (built-in or ``CustomTextCLIP.text``); refused otherwise."""
    return TextTower(model)
