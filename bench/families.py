"""Cost of one explanation per model family, in image forwards of the same model.

For each architecture (random weights, seed 0; SigLIP's with a locally built tokenizer of its kind,
``testing.families.build_real``), one image and one caption are explained at ``--steps`` points, cut
at the last blocks (or ``--layers``), by each route: the image's own factor (forward tangents, or
reverse passes where the embedding is narrower than the image's rows), contraction of the caption's
factor through the image embedding, and the engine's own choice. Times are CPU seconds of this
process (``time.process_time``), divided by one image forward measured just before. CLIP pools its
last block on the class token (one row per tangent); SigLIP's attention pooling reads every row, so
its last block runs on all of them.

    OMP_NUM_THREADS=1 nice -n 10 python bench/families.py --models ViT-B-16 ViT-B-16-SigLIP --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from attribution.explainer import Explainer
from testing import random_clip
from testing.families import build_real

CAPTION = "a photo of a brown dog on the grass"


def cpu_seconds(call: Callable[[], object]) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def build(name: str) -> tuple[Any, Any, torch.Tensor]:
    """The model, its tokenizer and one seeded random image of its size."""
    try:
        model, tokenizer, image = random_clip(name)
        return model, tokenizer, image
    except Exception:  # a model whose tokenizer must be built locally (SigLIP and others)
        model, tokenizer = build_real(name)
        size = model.visual.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return model, tokenizer, torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-B-16-SigLIP"])
    parser.add_argument("--layers", nargs="+", type=int, default=[-1], help="-1: each tower's last block")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--routes", nargs="+", default=["auto", "own factor", "contraction"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    flags = {"auto": None, "own factor": False, "contraction": True}
    print("| model | layer | N | image rows | text rows | route | CPU s | image forwards |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name in args.models:
        model, tokenizer, image = build(name)
        model.encode_image(image)
        forward = min(cpu_seconds(lambda m=model, x=image: m.encode_image(x)) for _ in range(3))
        for layer in args.layers:
            cut = None if layer < 0 else layer
            for route in args.routes:
                explainer = Explainer(model, tokenizer, cut, cut, args.steps, contraction=flags[route])
                explainer.explain(image, ["a dog"])  # warm: references cached
                image_rows = explainer.image.hidden(image, 0).shape[1]
                text_rows = len(explainer._text_inputs(explainer.tokenize([CAPTION])[0]))
                seconds = cpu_seconds(lambda e=explainer, x=image: e.explain(x, [CAPTION]))
                print(
                    f"| {name} | {layer if cut is not None else 'last'} | {args.steps} | {image_rows} "
                    f"| {text_rows} | {route} | {seconds:.1f} | {seconds / forward:.1f} |"
                )
        print(f"\n{name}: one image forward {forward * 1000:.0f} ms CPU\n")


if __name__ == "__main__":
    main()
