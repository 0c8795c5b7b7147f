"""Coverage of open_clip's pretrained models: every architecture ``open_clip.list_pretrained()`` names is
either explained (``unsupported_reason(cfg)`` is None) or on the explicit refusal list below, with the
reason the library gives. A new open_clip release that adds, drops or changes an architecture, or a
library change that alters what is refused, fails here until this list says so.

The slow tests build real architectures of the new families (random weights, local tokenizers) and
explain them at their last blocks, checking the engine's embeddings against the model's own.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from attribution.errors import UnsupportedModel
from attribution.explainer import Explainer
from attribution.models import load_model, unsupported_reason
from testing import build_real

RESNET = "its image tower is a ResNet, not a ViT"


def timm_tower(name: str) -> str:
    return f"its image tower is a timm model ({name}), not open_clip's ViT"


# Every refused architecture with a pretrained tag, and why (the library's own words).
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        [
            "RN101",
            "RN101-quickgelu",
            "RN50",
            "RN50-quickgelu",
            "RN50x16",
            "RN50x16-quickgelu",
            "RN50x4",
            "RN50x4-quickgelu",
            "RN50x64",
            "RN50x64-quickgelu",
        ],
        RESNET,
    ),
    **dict.fromkeys(
        [
            "ViT-H-14-CLIPA",
            "ViT-H-14-CLIPA-336",
            "ViT-L-14-CLIPA",
            "ViT-L-14-CLIPA-336",
            "ViT-bigG-14-CLIPA",
            "ViT-bigG-14-CLIPA-336",
        ],
        "its image tower pools with 'avg' instead of the class token",
    ),
    **dict.fromkeys(
        [
            "ViT-H-14-worldwide",
            "ViT-H-14-worldwide-378",
            "ViT-H-14-worldwide-quickgelu",
            "ViT-bigG-14-worldwide",
            "ViT-bigG-14-worldwide-378",
        ],
        "its text tower does not pool on the end-of-text token of a causal transformer",
    ),
    **dict.fromkeys(
        [
            "coca_ViT-B-32",
            "coca_ViT-L-14",
            "nllb-clip-base",
            "nllb-clip-large",
            "roberta-ViT-B-32",
            "xlm-roberta-base-ViT-B-32",
            "xlm-roberta-large-ViT-H-14",
        ],
        "it has a custom or Hugging Face text tower (CustomTextCLIP / CoCa), not CLIP's own",
    ),
    "EVA01-g-14": timm_tower("eva_giant_patch14_224"),
    "EVA01-g-14-plus": timm_tower("eva_giant_patch14_224"),
    "EVA02-B-16": timm_tower("eva02_base_patch16_clip_224"),
    "EVA02-E-14": timm_tower("eva02_enormous_patch14_clip_224"),
    "EVA02-E-14-plus": timm_tower("eva02_enormous_patch14_clip_224"),
    "EVA02-L-14": timm_tower("eva02_large_patch14_clip_224"),
    "EVA02-L-14-336": timm_tower("eva02_large_patch14_clip_336"),
    "MobileCLIP-B": timm_tower("vit_base_mci_224"),
    "MobileCLIP-S1": timm_tower("fastvit_mci1"),
    "MobileCLIP-S2": timm_tower("fastvit_mci2"),
    "MobileCLIP2-B": timm_tower("vit_base_mci_224"),
    "MobileCLIP2-L-14": timm_tower("vit_large_patch14_clip_224"),
    "MobileCLIP2-S0": timm_tower("fastvit_mci0"),
    "MobileCLIP2-S2": timm_tower("fastvit_mci2"),
    "MobileCLIP2-S3": timm_tower("fastvit_mci3"),
    "MobileCLIP2-S4": timm_tower("fastvit_mci4"),
    "PE-Core-B-16": timm_tower("vit_pe_core_base_patch16_224"),
    "PE-Core-L-14-336": timm_tower("vit_pe_core_large_patch14_336"),
    "PE-Core-S-16-384": timm_tower("vit_pe_core_small_patch16_384"),
    "PE-Core-T-16-384": timm_tower("vit_pe_core_tiny_patch16_384"),
    "PE-Core-bigG-14-448": timm_tower("vit_pe_core_gigantic_patch14_448"),
    "ViT-B-16-SigLIP": timm_tower("vit_base_patch16_siglip_224"),
    "ViT-B-16-SigLIP-256": timm_tower("vit_base_patch16_siglip_256"),
    "ViT-B-16-SigLIP-384": timm_tower("vit_base_patch16_siglip_384"),
    "ViT-B-16-SigLIP-512": timm_tower("vit_base_patch16_siglip_512"),
    "ViT-B-16-SigLIP-i18n-256": timm_tower("vit_base_patch16_siglip_256"),
    "ViT-B-16-SigLIP2": timm_tower("vit_base_patch16_siglip_224"),
    "ViT-B-16-SigLIP2-256": timm_tower("vit_base_patch16_siglip_256"),
    "ViT-B-16-SigLIP2-384": timm_tower("vit_base_patch16_siglip_384"),
    "ViT-B-16-SigLIP2-512": timm_tower("vit_base_patch16_siglip_512"),
    "ViT-B-32-SigLIP2-256": timm_tower("vit_base_patch32_siglip_256"),
    "ViT-L-16-SigLIP-256": timm_tower("vit_large_patch16_siglip_256"),
    "ViT-L-16-SigLIP-384": timm_tower("vit_large_patch16_siglip_384"),
    "ViT-L-16-SigLIP2-256": timm_tower("vit_large_patch16_siglip_256"),
    "ViT-L-16-SigLIP2-384": timm_tower("vit_large_patch16_siglip_384"),
    "ViT-L-16-SigLIP2-512": timm_tower("vit_large_patch16_siglip_512"),
    "ViT-SO400M-14-SigLIP": timm_tower("vit_so400m_patch14_siglip_224"),
    "ViT-SO400M-14-SigLIP-378": timm_tower("vit_so400m_patch14_siglip_378"),
    "ViT-SO400M-14-SigLIP-384": timm_tower("vit_so400m_patch14_siglip_384"),
    "ViT-SO400M-14-SigLIP2": timm_tower("vit_so400m_patch14_siglip_224"),
    "ViT-SO400M-14-SigLIP2-378": timm_tower("vit_so400m_patch14_siglip_378"),
    "ViT-SO400M-16-SigLIP-i18n-256": timm_tower("vit_so400m_patch16_siglip_256"),
    "ViT-SO400M-16-SigLIP2-256": timm_tower("vit_so400m_patch16_siglip_256"),
    "ViT-SO400M-16-SigLIP2-384": timm_tower("vit_so400m_patch16_siglip_384"),
    "ViT-SO400M-16-SigLIP2-512": timm_tower("vit_so400m_patch16_siglip_512"),
    "ViT-gopt-16-SigLIP2-256": timm_tower("vit_giantopt_patch16_siglip_256"),
    "ViT-gopt-16-SigLIP2-384": timm_tower("vit_giantopt_patch16_siglip_384"),
    "ViTamin-B": timm_tower("vitamin_base_224"),
    "ViTamin-B-LTT": timm_tower("vitamin_base_224"),
    "ViTamin-L": timm_tower("vitamin_large_224"),
    "ViTamin-L-256": timm_tower("vitamin_large_256"),
    "ViTamin-L-336": timm_tower("vitamin_large_336"),
    "ViTamin-L-384": timm_tower("vitamin_large_384"),
    "ViTamin-L2": timm_tower("vitamin_large2_224"),
    "ViTamin-L2-256": timm_tower("vitamin_large2_256"),
    "ViTamin-L2-336": timm_tower("vitamin_large2_336"),
    "ViTamin-L2-384": timm_tower("vitamin_large2_384"),
    "ViTamin-S": timm_tower("vitamin_small_224"),
    "ViTamin-S-LTT": timm_tower("vitamin_small_224"),
    "ViTamin-XL-256": timm_tower("vitamin_xlarge_256"),
    "ViTamin-XL-336": timm_tower("vitamin_xlarge_336"),
    "ViTamin-XL-384": timm_tower("vitamin_xlarge_384"),
    "convnext_base": timm_tower("convnext_base"),
    "convnext_base_w": timm_tower("convnext_base"),
    "convnext_base_w_320": timm_tower("convnext_base"),
    "convnext_large_d": timm_tower("convnext_large"),
    "convnext_large_d_320": timm_tower("convnext_large"),
    "convnext_xxlarge": timm_tower("convnext_xxlarge"),
    "nllb-clip-base-siglip": timm_tower("vit_base_patch16_siglip_384"),
    "nllb-clip-large-siglip": timm_tower("vit_so400m_patch14_siglip_384"),
}
# Explained: architectures and their pretrained weights (open_clip 3.3.0).
EXPLAINED_ARCHITECTURES = 17
EXPLAINED_WEIGHTS = 80


def test_every_pretrained_architecture_is_explained_or_refused_for_its_stated_reason() -> None:
    pretrained = open_clip.list_pretrained()
    reasons = {arch: unsupported_reason(open_clip.get_model_config(arch)) for arch, _ in pretrained}
    refused = {arch: reason for arch, reason in reasons.items() if reason is not None}
    explained = sorted(arch for arch, reason in reasons.items() if reason is None)
    explained_weights = sum(1 for arch, _ in pretrained if reasons[arch] is None)
    print(
        f"coverage: {len(explained)} of {len(reasons)} architectures, {explained_weights} of "
        f"{len(pretrained)} pretrained weights: {', '.join(explained)}"
    )
    assert refused == REFUSED
    assert (len(explained), explained_weights) == (EXPLAINED_ARCHITECTURES, EXPLAINED_WEIGHTS)


@pytest.mark.parametrize("reason", sorted(set(REFUSED.values())))
def test_loading_a_refused_architecture_says_why(reason: str) -> None:
    arch = next(a for a, r in REFUSED.items() if r == reason)
    with pytest.raises(UnsupportedModel) as caught:
        load_model(arch, None)
    assert reason in str(caught.value)


# Real architectures of the new families, about 60 s together on two cores. MetaCLIP 2's smallest
# (ViT-H-14-worldwide, with its 901 629-row text table shrunk by build_real's vocab_size) took 65 s alone:
# its towers are covered at tiny size by tests/attribution/test_oracle_families.py.
REAL = [("ViT-B-16-SigLIP", None), ("ViT-B-16-SigLIP2", None), ("ViT-L-14-CLIPA", None)]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "vocab_size"), REAL, ids=[a for a, _ in REAL])
def test_real_architecture_explains(arch: str, vocab_size: int | None) -> None:
    """Built as open_clip builds it (random weights, a local tokenizer of its kind), explained at its last
    blocks from a caption: the engine's embeddings are the model's own (its score is their cosine) and
    every entry adds up to the completeness total."""
    model, tokenizer = build_real(arch, vocab_size=vocab_size)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    caption = "a photo of a dog"
    result = Explainer(model, tokenizer, steps=1).explain(image, [caption])[0]
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([caption])), dim=-1)
        img = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
    assert result.score == pytest.approx(float(text[0] @ img[0]), abs=1e-5)
    entries = result.entries()
    assert torch.isfinite(entries).all() and entries.abs().max() > 0
    assert float(entries.double().sum()) == pytest.approx(result.completeness.total, abs=1e-5)
    patch = model.visual.patch_size if hasattr(model.visual, "patch_size") else None
    grid = tuple(
        s // p for s, p in zip(size, patch or model.visual.trunk.patch_embed.patch_size, strict=True)
    )
    assert tuple(result.interactions.shape[1:]) == grid
