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


def not_a_vit(trunk: str) -> str:
    return (
        f"the timm image tower {trunk} is not timm's VisionTransformer "
        "(EVA, rope, MobileCLIP and convolutional trunks are not supported)"
    )


def names(text: str) -> list[str]:
    return text.split()


# Every refused architecture with a pretrained tag, and why (the library's own words).
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        names(
            "EVA01-g-14 EVA01-g-14-plus EVA02-B-16 EVA02-E-14 EVA02-E-14-plus EVA02-L-14 EVA02-L-14-336 "
            "PE-Core-B-16 PE-Core-L-14-336 PE-Core-S-16-384 PE-Core-T-16-384 PE-Core-bigG-14-448"
        ),
        not_a_vit("Eva"),
    ),
    **dict.fromkeys(
        names(
            "MobileCLIP-B MobileCLIP2-B ViTamin-B ViTamin-B-LTT ViTamin-L ViTamin-L-256 ViTamin-L-336 "
            "ViTamin-L-384 ViTamin-L2 ViTamin-L2-256 ViTamin-L2-336 ViTamin-L2-384 ViTamin-S "
            "ViTamin-S-LTT ViTamin-XL-256 ViTamin-XL-336 ViTamin-XL-384"
        ),
        "the timm ViT embeds patches dynamically or with a non-standard embedder",
    ),
    **dict.fromkeys(
        names("MobileCLIP-S1 MobileCLIP-S2 MobileCLIP2-S0 MobileCLIP2-S2 MobileCLIP2-S3 MobileCLIP2-S4"),
        not_a_vit("FastVit"),
    ),
    **dict.fromkeys(
        names("MobileCLIP2-L-14"),
        (
            "its non-causal text tower pools with 'argmax' (only 'argmax' or 'eos' when causal, 'last' "
            "when not)"
        ),
    ),
    **dict.fromkeys(
        names(
            "RN101 RN101-quickgelu RN50 RN50-quickgelu RN50x16 RN50x16-quickgelu RN50x4 "
            "RN50x4-quickgelu RN50x64 RN50x64-quickgelu"
        ),
        RESNET,
    ),
    **dict.fromkeys(
        names(
            "coca_ViT-B-32 coca_ViT-L-14 nllb-clip-base nllb-clip-base-siglip nllb-clip-large "
            "nllb-clip-large-siglip roberta-ViT-B-32 xlm-roberta-base-ViT-B-32 "
            "xlm-roberta-large-ViT-H-14"
        ),
        ("it has a Hugging Face text tower or a multimodal decoder (CoCa), not open_clip's transformer"),
    ),
    **dict.fromkeys(
        names("convnext_base convnext_base_w convnext_base_w_320 convnext_xxlarge"), not_a_vit("ConvNeXt")
    ),
    **dict.fromkeys(
        names("convnext_large_d convnext_large_d_320"),
        "its timm image tower pools with '' or projects with 'mlp' (not linear)",
    ),
}
# Explained: architectures and their pretrained weights (open_clip 3.3.0).
EXPLAINED_ARCHITECTURES = 54
EXPLAINED_WEIGHTS = 118


def test_every_pretrained_architecture_is_explained_or_refused_for_its_stated_reason() -> None:
    pretrained = open_clip.list_pretrained()
    architectures = sorted({arch for arch, _ in pretrained})
    reasons = {arch: unsupported_reason(open_clip.get_model_config(arch)) for arch in architectures}
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
# (ViT-H-14-worldwide, its 901 629-row text table shrunk with build_real's vocab_size) took 65 s alone:
# its towers are compared at tiny size in tests/attribution/test_oracle_families.py.
REAL = ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-L-14-CLIPA"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", REAL)
def test_real_architecture_explains(arch: str) -> None:
    """Built as open_clip builds it (random weights, a local tokenizer of its kind), explained at its last
    blocks: the engine's embeddings are the model's own (its score is their cosine), every entry adds up
    to the completeness total, the grid is the patch grid."""
    model, tokenizer = build_real(arch)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    caption = "a photo of a dog"
    explainer = Explainer(model, tokenizer, steps=1)
    assert arch not in REFUSED
    result = explainer.explain(image, [caption])[0]
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([caption])), dim=-1)
        img = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
    assert result.score == pytest.approx(float(text[0] @ img[0]), abs=1e-5)
    entries = result.entries()
    assert torch.isfinite(entries).all() and entries.abs().max() > 0
    assert float(entries.double().sum()) == pytest.approx(result.completeness.total, abs=1e-5)
    patch = 14 if "-14-" in arch else 16  # the architecture's name says its patch size
    assert tuple(result.interactions.shape[1:]) == (size[0] // patch, size[1] // patch)
