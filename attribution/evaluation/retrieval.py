"""How well a CLIP matches captioned scenes: retrieval top-1 and the binding test of swapped captions.

Used by scripts/train_scenes.py for its held-out curve, by the tests of the shipped ``exclip-scenes`` and
``exclip-scenes-siglip`` and by BENCHMARKS.md, so the numbers everywhere mean the same thing:

- ``i2t_top1``: for each image, the best-scoring caption among the set's captions describes it
  (``scenes.describes``: its own, or another scene's caption that is just as true of it, e.g. "there is a
  red circle" for a picture of a red circle: no image can tell which template its caption used);
- ``t2i_top1``: likewise from each caption to the images;
- ``colour_swap`` / ``shape_swap``: how often the true caption scores above the same caption with two
  objects' colours (shapes) exchanged, over the scenes that have such a swap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import CLIP, CustomTextCLIP

from attribution.evaluation.scenes import Scene, describes, swapped_captions
from attribution.text import Tokenizer
from attribution.tokenizers import HFTokenizer


def scene_pixels(scenes: list[Scene], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Scenes as a normalised (N, 3, H, W) batch: the model's eval transform for images of its own size."""
    x = torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def retrieval_accuracy(
    model: CLIP | CustomTextCLIP,
    tokenizer: Tokenizer | HFTokenizer,
    pixels: torch.Tensor,
    scenes: list[Scene],
) -> dict[str, float]:
    """The four accuracies above, plus ``score`` = the smallest of i2t, colour_swap and shape_swap."""
    was_training = model.training
    model.eval()
    captions = [s.caption for s in scenes]
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    sim = img @ txt.T
    n = len(scenes)
    result = {
        "i2t_top1": float(np.mean([describes(captions[int(sim[i].argmax())], scenes[i]) for i in range(n)])),
        "t2i_top1": float(
            np.mean([describes(captions[i], scenes[int(sim[:, i].argmax())]) for i in range(n)])
        ),
    }
    for attr in ("colour", "shape"):
        rows = [(i, getattr(swapped_captions(s), attr)) for i, s in enumerate(scenes)]
        rows = [(i, text) for i, text in rows if text is not None]
        if not rows:
            result[f"{attr}_swap"] = float("nan")
            continue
        neg = F.normalize(model.encode_text(tokenizer([text for _, text in rows])), dim=-1)
        idx = torch.tensor([i for i, _ in rows])
        wins = (img[idx] * txt[idx]).sum(-1) > (img[idx] * neg).sum(-1)
        result[f"{attr}_swap"] = float(wins.float().mean())
    result["score"] = min(result["i2t_top1"], result["colour_swap"], result["shape_swap"])
    model.train(was_training)
    return result
