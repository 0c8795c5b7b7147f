"""The two encoders of an open_clip CLIP model, cut at a chosen block.

Each tower gives the hidden states entering block ``layer`` (for inputs and for the method's
uninformative reference), the row that is pooled into the embedding, and the tail above the cut as
explicit weights (see :mod:`attribution.tail`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attribution.errors import InvalidOption, UnsupportedModel
from attribution.tail import Head, Tail, block_weights, layer_norm_weights


def _check_blocks(blocks: nn.ModuleList, tower: str) -> None:
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            raise UnsupportedModel(
                f"the {tower} tower uses {type(block).__name__} blocks; only open_clip's standard "
                "ResidualAttentionBlock (nn.MultiheadAttention) is supported"
            )


def _check_layer(layer: int, n_layers: int, name: str) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise InvalidOption(f"{name} must be an integer block index from 0 to {n_layers - 1}, got {layer!r}")


class TextTower:
    """The text transformer of an open_clip ``CLIP`` (built-in text tower, EOT pooling)."""

    def __init__(self, clip: nn.Module) -> None:
        # open_clip is untyped: its submodules come from nn.Module.__getattr__, so treat them as Any.
        model: Any = clip
        if not all(hasattr(model, a) for a in ("transformer", "token_embedding", "ln_final")):
            raise UnsupportedModel(
                f"{type(model).__name__} has no built-in text transformer; only open_clip CLIP models "
                "(not CustomTextCLIP/SigLIP/CoCa) are supported"
            )
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise UnsupportedModel(
                f"text pooling {model.text_pool_type!r} is not supported; only 'argmax' (EOT) pooling"
            )
        _check_blocks(model.transformer.resblocks, "text")
        self.model: Any = model
        self.blocks: nn.ModuleList = model.transformer.resblocks
        self.context_length: int = model.positional_embedding.shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> None:
        _check_layer(layer, self.n_layers, "text_layer")

    def mask(self, length: int) -> Tensor | None:
        mask: Tensor | None = self.model.attn_mask
        return None if mask is None else mask[:length, :length]

    def pool_index(self, tokens: Tensor) -> Tensor:
        # The EOT id is the largest in CLIP's vocabulary, as both open_clip and the reference assume.
        return tokens.argmax(dim=-1)

    @torch.no_grad()
    def hidden(self, tokens: Tensor, layer: int) -> Tensor:
        """Hidden states entering block ``layer`` for token ids (B, S) → (B, S, W).

        The mask is causal, so cutting the ids after the last EOT changes no kept row.
        """
        cast = self.model.transformer.get_cast_dtype()
        length = tokens.shape[-1]
        x: Tensor = self.model.token_embedding(tokens).to(cast)
        x = x + self.model.positional_embedding[:length].to(cast)
        mask = self.mask(length)
        for block in self.blocks[:layer]:
            x = block(x, attn_mask=mask)
        return x

    def tail(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tail:
        proj = self.model.text_projection
        if isinstance(proj, nn.Linear):
            projection, bias = proj.weight.detach().T, proj.bias
        else:
            projection, bias = proj.detach(), None
        mask: Tensor | None = self.model.attn_mask
        return Tail(
            blocks=tuple(block_weights(b, dtype, device) for b in self.blocks[layer:]),
            head=Head(
                layer_norm_weights(self.model.ln_final, dtype, device),
                projection.to(device=device, dtype=dtype),
                None if bias is None else bias.detach().to(device=device, dtype=dtype),
            ),
            mask=None if mask is None else mask.to(device=device, dtype=dtype),
        )


class ImageTower:
    """An open_clip ``VisionTransformer`` with class-token pooling."""

    def __init__(self, model: nn.Module) -> None:
        visual: Any = model.visual  # untyped open_clip VisionTransformer
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise UnsupportedModel(
                f"the image tower {type(visual).__name__} is not an open_clip VisionTransformer; "
                "ResNet and timm towers are not supported"
            )
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise UnsupportedModel("only class-token pooling is supported in the image tower")
        _check_blocks(visual.transformer.resblocks, "image")
        self.visual: Any = visual
        self.blocks: nn.ModuleList = visual.transformer.resblocks

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> None:
        _check_layer(layer, self.n_layers, "image_layer")

    @torch.no_grad()
    def hidden(self, images: Tensor, layer: int) -> Tensor:
        """Hidden states entering block ``layer`` for images (B, 3, H, W) → (B, 1 + patches, W)."""
        x: Tensor = self.visual._embeds(images)
        for block in self.blocks[:layer]:
            x = block(x)
        return x

    def tail(self, layer: int, dtype: torch.dtype, device: torch.device) -> Tail:
        proj = self.visual.proj
        return Tail(
            blocks=tuple(block_weights(b, dtype, device) for b in self.blocks[layer:]),
            head=Head(
                layer_norm_weights(self.visual.ln_post, dtype, device),
                proj.detach().to(device=device, dtype=dtype),
                None,
            ),
            mask=None,
        )
