"""Cost of one explanation per model family, in image forwards of the same model.

For each architecture (random weights, seed 0; SigLIP's with a locally built tokenizer of its kind,
``testing.families.build_real``), one image and one caption (cut to ``--caption-rows`` tokens, as
the local tokenizers spell words letter by letter) are explained at ``--steps`` points, cut
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
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from common import line_buffered_stdout

from attribution.explainer import Explainer
from testing import random_clip
from testing.families import build_real

CAPTION = "a photo of a brown dog on the grass"  # 11 rows with CLIP's SOT and EOT


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


def caption_ids(explainer: Explainer, rows: int) -> torch.Tensor:
    """CAPTION's ids cut to ``rows`` caption rows, its end token kept last: the local tokenizers of
    the other families spell words letter by letter, so the same text would have more rows."""
    ids = explainer.tokenize([CAPTION])[0]
    n = explainer._caption_rows(explainer._text_inputs(ids))
    if n <= rows:
        return ids
    return torch.cat([ids[: rows - 1], ids[n - 1 : n]])


def main() -> None:
    line_buffered_stdout()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-B-16-SigLIP"])
    parser.add_argument("--layers", nargs="+", type=int, default=[-1], help="-1: each tower's last block")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--routes", nargs="+", default=["auto", "own factor", "contraction"])
    parser.add_argument("--caption-rows", type=int, default=11, help="caption tokens, start/end included")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    flags = {"auto": None, "own factor": False, "contraction": True}
    print(f"caption rows: {args.caption_rows} (text rows: all rows the text tower reads)\n")
    print("| model | layer | N | image rows | text rows | route | CPU s | image forwards |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name in args.models:
        model, tokenizer, image = build(name)
        model.encode_image(image)
        forward = min(cpu_seconds(partial(model.encode_image, image)) for _ in range(3))
        for layer in args.layers:
            cut = None if layer < 0 else layer
            for route in args.routes:
                explainer = Explainer(model, tokenizer, cut, cut, args.steps, contraction=flags[route])
                explainer.explain(image, ["a dog"])  # warm: references cached
                image_rows = explainer.image.hidden(image, 0).shape[1]
                ids = caption_ids(explainer, args.caption_rows)
                text_rows = len(explainer._text_inputs(ids))
                seconds = cpu_seconds(partial(explainer.explain_tokens, image, [ids]))
                print(
                    f"| {name} | {layer if cut is not None else 'last'} | {args.steps} | {image_rows} "
                    f"| {text_rows} | {route} | {seconds:.1f} | {seconds / forward:.1f} |"
                )
        print(f"\n{name}: one image forward {forward * 1000:.0f} ms CPU\n")


if __name__ == "__main__":
    main()
