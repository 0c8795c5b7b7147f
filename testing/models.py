"""Seeded random models and inputs: no weights can be downloaded, so tests and benchmarks make them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def random_clip(name: str, n_images: int = 1, device: str = "cpu") -> tuple[Any, Any, Any]:
    """An open_clip ``name`` with seeded random weights (seed 0), eval mode, on ``device``; its tokenizer;
    and ``n_images`` seeded random inputs (seed 1) of its image size, (n, 3, H, W).

    The same model and inputs in every test and benchmark that compares engines or measures costs.
    """
    import open_clip
    import torch

    import attribution.models  # noqa: F401 - importing registers exclip-tiny and exclip-scenes

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval().to(device)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(n_images, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, open_clip.get_tokenizer(name), images


def perturb_norms_and_biases(model: Any) -> Any:
    """``model`` with every norm and bias moved off its initial value (in place; returned): the engine is
    compared on a model whose LayerNorms are not the identity, a stricter test than a fresh init.

    open_clip names its norms ``ln_*``, timm ``norm*``."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("ln" in name or "norm" in name or "bias" in name):  # open_clip, timm
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_tiny_checkpoint(directory: Path, seed: int = 0) -> str:
    """Save an ``exclip-tiny`` state_dict (seeded random weights) in ``directory``; return its path.

    Pass it as ``--pretrained`` / ``EXCLIP_PRETRAINED``: random init differs per process, a file does not.
    """
    import open_clip
    import torch

    from attribution.models import TINY_MODEL  # importing registers the architecture

    torch.manual_seed(seed)
    path = Path(directory) / "exclip-tiny.pt"
    torch.save(open_clip.create_model(TINY_MODEL, pretrained=None).state_dict(), path)
    return str(path)


def distinct_captions(text: str, n: int) -> list[str]:
    """``n`` different captions: the engine computes each distinct caption once, so repeats cost nothing."""
    return [f"{text} {i}" for i in range(n)]
