"""attribution/timm_archs.py and the config that names it: ``exclip-scenes-siglip`` builds as a SigLIP-style
model (timm ViT without class token, attention-pool head; non-causal text tower pooled on the last token;
a learnt logit bias) at the size of ``exclip-scenes``."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch

from attribution.models import SCENES_MODEL, SCENES_SIGLIP_MODEL
from attribution.timm_archs import vit_exclip_scenes_map


def test_the_local_tower_is_registered_with_timm_and_siglip_shaped():
    assert "vit_exclip_scenes_map" in timm.list_models("vit_exclip_*")
    vit = timm.create_model("vit_exclip_scenes_map", num_classes=0)
    assert vit.cls_token is None and vit.no_embed_class and vit.global_pool == "map"
    assert vit.pos_embed.shape == (1, 64, 96)  # an 8x8 grid of patches, no class-token position
    assert (len(vit.blocks), vit.embed_dim, vit.patch_embed.patch_size) == (4, 96, (8, 8))
    assert vit(torch.zeros(2, 3, 64, 64)).shape == (2, 96)
    with pytest.raises(ValueError, match="no timm pretrained weights"):
        vit_exclip_scenes_map(pretrained=True)


def test_the_config_builds_siglip_towers_at_the_scenes_size():
    model = open_clip.create_model(SCENES_SIGLIP_MODEL, pretrained=None)
    assert isinstance(model, open_clip.CustomTextCLIP)
    trunk = model.visual.trunk
    assert trunk.attn_pool is not None and trunk.cls_token is None
    # timm_proj none: the embedding is the map head's output, nothing after it.
    assert len(model.visual.head) == 0 and isinstance(trunk.head, torch.nn.Identity)
    text = model.text
    assert text.attn_mask is None and text.pool_type == "last"  # non-causal, pooled on the last token
    assert text.text_projection.bias is not None
    assert (text.context_length, text.vocab_size, text.width, len(text.transformer.resblocks)) == (
        32,
        128,
        64,
        4,
    )
    assert float(model.logit_bias) == -10.0 and float(model.logit_scale.exp()) == pytest.approx(10.0)
    # The same image and embedding sizes as exclip-scenes.
    scenes = open_clip.get_model_config(SCENES_MODEL)
    assert model.visual.image_size == (scenes["vision_cfg"]["image_size"],) * 2
    image, text_emb = (
        model.encode_image(torch.zeros(2, 3, 64, 64)),
        model.encode_text(torch.ones(2, 32).long()),
    )
    assert image.shape == text_emb.shape == (2, scenes["embed_dim"])
