"""How the demo CLIP ``exclip-scenes`` learns from scenes: the seeded batches, the hard negatives and
the two losses (``scripts/train_scenes.py`` runs them; its tests check them here).

Contrastive CLIP loss over the batch, with each image's colour- and shape-swapped captions added as
hard negatives (NegCLIP), and a binding loss that asks each image to pick its caption among its own
swaps. Every step draws new scenes from a seed derived from (seed, step), so a resumed run sees exactly
the data an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attribution.evaluation.scenes import (
    MAX_OBJECTS,
    Scene,
    describes,
    iter_scenes,
    replaced_caption,
    swapped_captions,
)


def objects_mix(step: int, curriculum_steps: int) -> list[float]:
    """Share of scenes with 1, 2, 3 objects: mostly simple scenes first, then mostly 2–3 (binding)."""
    t = min(1.0, step / max(1, curriculum_steps))
    start, end = np.array([0.5, 0.35, 0.15]), np.array([0.2, 0.4, 0.4])
    return list((1 - t) * start + t * end)


def training_batch(seed: int, step: int, batch: int, mix: list[float], image_size: int) -> list[Scene]:
    step_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    counts = np.random.default_rng(step_seed).multinomial(batch, mix)
    scenes: list[Scene] = []
    for n_objects, count in zip(range(1, MAX_OBJECTS + 1), counts, strict=True):
        stream = iter_scenes(step_seed + n_objects, n_objects=n_objects, image_size=image_size)
        scenes.extend(next(stream) for _ in range(count))
    return scenes


def negatives(
    scenes: list[Scene], rng: np.random.Generator, replaced: bool = False
) -> tuple[list[str], list[int]]:
    """Each scene's colour- and shape-swapped captions (and with ``replaced`` one caption with a shape
    replaced by another, for every scene), and the index of the scene each belongs to."""
    texts, owners = [], []
    for i, scene in enumerate(scenes):
        swaps = swapped_captions(scene, rng)
        candidates = [swaps.colour, swaps.shape]
        if replaced:
            candidates.append(replaced_caption(scene, "shape", rng))
        for text in candidates:
            if text is not None:
                texts.append(text)
                owners.append(i)
    return texts, owners


def also_true_mask(scenes: list[Scene], texts: list[str]) -> torch.Tensor:
    """(n, len(texts)) True where text j, other than scene i's own caption, also describes scene i.

    Such a caption is no negative: two pictures of a red circle are both "a red circle", whatever the
    template, so the contrastive loss must not push them apart.
    """
    mask = torch.tensor([[describes(t, s) for t in texts] for s in scenes])
    mask[torch.arange(len(scenes)), torch.arange(len(scenes))] = False
    return mask


def clip_losses(
    model: Any,  # an open_clip CLIP (untyped)
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    also_true: torch.Tensor,
    owners: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive loss with hard negatives, binding loss among each image's own swaps).

    ``tokens`` holds the batch's captions followed by the negatives; ``owners[m]`` is the image whose
    swap negative ``m`` is; ``also_true`` (from ``also_true_mask``) removes the false negatives.
    """
    n = pixels.shape[0]
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * img @ txt.T  # (n, n + m)
    logits = logits.masked_fill(also_true, float("-inf"))
    target = torch.arange(n)
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2
    if not owners:
        return contrastive, torch.zeros(())
    # Binding: each image with swaps chooses among [its caption, its own swaps] (-inf elsewhere).
    own = torch.full((n, tokens.shape[0] - n), float("-inf"))
    own[torch.tensor(owners), torch.arange(len(owners))] = 0.0
    has = torch.zeros(n, dtype=torch.bool)
    has[torch.tensor(owners)] = True
    pos = logits[torch.arange(n), torch.arange(n)][:, None]
    binding_logits = torch.cat([pos, logits[:, n:] + own], dim=1)[has]
    binding = F.cross_entropy(binding_logits, torch.zeros(int(has.sum()), dtype=torch.long))
    return contrastive, binding
