"""How the demo models ``exclip-scenes`` and ``exclip-scenes-siglip`` learn from scenes: the seeded
batches, the hard negatives and the losses (``scripts/train_scenes.py`` runs them; its tests check them
here).

``exclip-scenes``: contrastive CLIP loss over the batch, with each image's colour- and shape-swapped captions
added as hard negatives (NegCLIP). ``exclip-scenes-siglip``: SigLIP's pairwise sigmoid loss instead, where the
same swapped captions are extra negative pairs. Both add a binding loss that asks each image to pick its
caption among its own swaps. Every step draws new scenes from a seed derived from (seed, step), so a resumed
run sees exactly the data an uninterrupted one would.
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
from attribution.models import SCENES_MODEL, SCENES_SIGLIP_MODEL

# The architectures the training and export scripts take (--arch), the first the default.
ARCHITECTURES = (SCENES_MODEL, SCENES_SIGLIP_MODEL)


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
    return contrastive, binding_loss(logits, owners)


def sigmoid_losses(
    model: Any,  # an open_clip CLIP or CustomTextCLIP with a logit_bias (untyped)
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    also_true: torch.Tensor,
    owners: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SigLIP's sigmoid loss with the swaps as extra negative pairs, binding loss among own swaps).

    Every (image, text) pair is a binary problem: logit ``scale * cos + bias``, label +1 for the image's
    own caption and -1 for every other caption and every negative; pairs where ``also_true`` holds (the
    text is just as true of the image) are left out. Summed over pairs, divided by the number of images,
    as SigLIP does. Arguments as for ``clip_losses``.
    """
    n = pixels.shape[0]
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias  # (n, n + m)
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n)] = 1.0
    pair_losses = -F.logsigmoid(labels * logits).masked_fill(also_true, 0.0)
    sigmoid = pair_losses.sum() / n
    return sigmoid, binding_loss(logits.masked_fill(also_true, float("-inf")), owners)


def binding_loss(logits: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """Cross-entropy of each image that has swaps choosing its caption among [its caption, its swaps].

    ``logits`` is (n, n + m): the n captions, then the m negatives, ``owners[k]`` the image of negative k.
    Zero when there are no swaps.
    """
    n = logits.shape[0]
    if not owners:
        return torch.zeros(())
    own = torch.full((n, logits.shape[1] - n), float("-inf"))  # -inf: another image's swap
    own[torch.tensor(owners), torch.arange(len(owners))] = 0.0
    has = torch.zeros(n, dtype=torch.bool)
    has[torch.tensor(owners)] = True
    pos = logits[torch.arange(n), torch.arange(n)][:, None]
    binding_logits = torch.cat([pos, logits[:, n:] + own], dim=1)[has]
    return F.cross_entropy(binding_logits, torch.zeros(int(has.sum()), dtype=torch.long))


# The training script's --loss choices.
LOSSES = {"contrastive": clip_losses, "sigmoid": sigmoid_losses}
