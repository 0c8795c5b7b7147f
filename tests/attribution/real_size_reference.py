"""The reference's (``exclip`` 1.1) token × image-token matrix, CLS column included, and the stored
result of its slow ViT-B-32 run at a middle block.

The reference at a middle block of ViT-B-32 with N = 10 takes about 20 minutes and 9 GB on two CPU
cores, too long for every CI run, so its matrix is stored (``real_size_reference.npz``, float32)
together with the rebuilt model's embeddings of the inputs, which tell a changed random init (a new
torch or open_clip) apart from a changed engine. Regenerate it with

    PYTHONPATH=. python tests/attribution/real_size_reference.py

The model is open_clip's ViT-B-32 with seeded random weights and the seeded input of
``testing.random_clip``; the caption is :data:`LONG_CAPTION`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from exclip.explanation import OpenClipExplainer

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testing import random_clip  # noqa: E402

STORED = Path(__file__).with_name("real_size_reference.npz")

# 27 tokens with SOT and EOT; commas, parentheses, "!", ";", an apostrophe and a full stop.
LONG_CAPTION = "A photo of a brown dog, with a red ball (and a stick!) on the green grass; it's sunny."
STEPS = 10
# A middle block of each tower, different ones so that swapped layer arguments would show.
MIDDLE_TEXT_LAYER, MIDDLE_IMAGE_LAYER = 6, 5


def reference_with_cls(model, tokenizer, image, caption, text_layer, image_layer, steps) -> torch.Tensor:
    """The reference's matrix with its CLS column, from its own integrated Jacobians and deltas.

    ``OpenClipExplainer.explain`` drops the CLS column; here its public steps are run one by one (hooks,
    encoders, ``_compute_integrated_jacobian``) and the token × image-token sum is formed from them.
    ``test_reference_with_cls_is_the_reference`` checks that this equals ``explain`` on the patches.
    """
    ref = OpenClipExplainer(
        model, image_dim=image.shape[-1], text_seq_len=model.context_length, device=image.device
    )
    tokens = tokenizer([caption]).to(image.device)
    try:
        ref.init_text_attribution(layer=text_layer, N_interpolations=steps)
        ref.init_image_attribution(layer=image_layer, N_interpolations=steps)
        text_emb, _ = ref.encode_text(tokens)
        image_emb, _ = ref.encode_image(image)
        text_states, image_states = ref.txt_intermediates[0], ref.img_intermediates[0]
        j_text = ref._compute_integrated_jacobian(text_emb, text_states, verbose=False)
        j_image = ref._compute_integrated_jacobian(image_emb, image_states, verbose=False)
    finally:
        ref.reset_attribution()  # the reference leaves its hooks on the model otherwise
    eot = int(tokens.argmax())
    d_text = (text_states[0] - text_states[-1]).detach().cpu()[: eot + 1]
    d_image = (image_states[0] - image_states[-1]).detach().cpu()
    t = torch.einsum("ksi,si->ks", j_text.cpu()[:, : eot + 1], d_text)
    x = torch.einsum("kpj,pj->kp", j_image.cpu(), d_image)
    a = t.T @ x / (text_emb[0].norm().cpu() * image_emb[0].norm().cpu())
    return a.detach()


def embeddings(model, tokenizer, image) -> tuple[np.ndarray, np.ndarray]:
    """The model's unnormalised text and image embeddings of the stored inputs (its fingerprint)."""
    with torch.no_grad():
        text = model.encode_text(tokenizer([LONG_CAPTION]))[0]
        img = model.encode_image(image)[0]
    return text.numpy().astype(np.float32), img.numpy().astype(np.float32)


def regenerate(path: Path = STORED) -> None:
    model, tokenizer, image = random_clip("ViT-B-32")
    text_emb, image_emb = embeddings(model, tokenizer, image)
    start = time.perf_counter()
    matrix = reference_with_cls(
        model, tokenizer, image, LONG_CAPTION, MIDDLE_TEXT_LAYER, MIDDLE_IMAGE_LAYER, STEPS
    )
    seconds = time.perf_counter() - start
    np.savez_compressed(
        path,
        matrix=matrix.numpy().astype(np.float32),  # (tokens SOT…EOT, CLS + patches)
        text_embedding=text_emb,
        image_embedding=image_emb,
        text_layer=MIDDLE_TEXT_LAYER,
        image_layer=MIDDLE_IMAGE_LAYER,
        steps=STEPS,
        caption=LONG_CAPTION,
        versions=f"torch {torch.__version__}, open_clip {open_clip.__version__}",
    )
    print(f"wrote {path} ({path.stat().st_size} bytes); the reference took {seconds:.0f} s")


if __name__ == "__main__":
    regenerate()
