"""Local timm image towers that open_clip model configs name with ``timm_model_name``.

``vit_exclip_scenes_map``: the image tower of the demo model ``exclip-scenes-siglip``, a tiny timm
``VisionTransformer`` built the way SigLIP's are (no class token, position embeddings on the patches
only, pooled by an attention-pool "map" head) at the size of ``exclip-scenes``'s: 64-pixel images,
8-pixel patches, width 96, 4 blocks of 3 heads. Importing this module registers it with timm.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def vit_exclip_scenes_map(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The scenes-sized SigLIP-style ViT; ``pretrained`` weights do not exist (the config says false)."""
    if pretrained:
        raise ValueError("vit_exclip_scenes_map has no timm pretrained weights (load a checkpoint instead)")
    config: dict[str, Any] = {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "class_token": False,
        "no_embed_class": True,
        "global_pool": "map",
    }
    # timm's create_model passes where pretrained weights would come from; there are none to load.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**(config | kwargs))
