"""Contraction through the embedding against each tower's own factor, below the last block.

For each model (random weights, seed 0) and layer, one image with ``--captions`` distinct 16-token
captions is explained with the image side computed from its own factor (one forward tangent per image
token, or one reverse pass per embedding axis) and by contraction (one reverse pass per text row of
each caption). Times are CPU seconds of this process (``time.process_time``; on a shared machine wall
time mostly measures the others), in image forwards of the same model measured just before. Both
routes must give the same matrix; the largest difference is printed.

    OMP_NUM_THREADS=1 nice -n 10 python bench/engine_contraction.py --models ViT-B-32 --layers 6 --steps 10
    python bench/engine_contraction.py --layers 6 --steps 2 --quadrature gauss-legendre --captions 1
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from common import line_buffered_stdout

from attribution.explainer import Explainer, PairResult
from attribution.quadrature import RIEMANN, RULES
from testing import random_clip

CAPTIONS = [
    "a photo of a brown dog with a red ball on the green grass",
    "a photo of a white cat asleep on a blue sofa near the window",
    "a photo of two people riding red bicycles down a busy street",
    "a photo of a small boat on a calm lake under grey clouds",
]  # 16 tokens each with SOT and EOT

T = TypeVar("T")


def cpu_seconds(call: Callable[[], T]) -> tuple[float, T]:
    """This process's CPU seconds for ``call`` and what it returned."""
    start = time.process_time()
    out = call()
    return time.process_time() - start, out


def main() -> None:
    line_buffered_stdout()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32"])
    parser.add_argument("--layers", nargs="+", type=int, default=[6])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--captions", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--quadrature", default=RIEMANN, choices=RULES)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(
        "| model | layer | rule | N | captions | image tokens | route | CPU s | image forwards "
        "| max rel. diff |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|")
    for name in args.models:
        model, tokenizer, image = random_clip(name)
        model.encode_image(image)
        forward = min(cpu_seconds(functools.partial(model.encode_image, image))[0] for _ in range(3))
        tokens = int(model.visual.grid_size[0] * model.visual.grid_size[1]) + 1
        for layer in args.layers:
            for n_captions in args.captions:
                captions = CAPTIONS[:n_captions]
                images = image.expand(n_captions, -1, -1, -1)
                results: dict[str, list[PairResult]] = {}
                for route, flag in (("own factor", False), ("contraction", True)):
                    explainer = Explainer(
                        model,
                        tokenizer,
                        layer,
                        layer,
                        args.steps,
                        quadrature=args.quadrature,
                        contraction=flag,
                    )
                    explainer.explain(image, ["a dog"])  # warm: references cached
                    seconds, out = cpu_seconds(functools.partial(explainer.explain, images, captions))
                    results[route] = out
                    diff = ""
                    if route == "contraction":
                        largest = max(
                            float((a.interactions - b.interactions).abs().max() / b.interactions.abs().max())
                            for a, b in zip(out, results["own factor"], strict=True)
                        )
                        diff = f"{largest:.1e}"
                    print(
                        f"| {name} | {layer} | {args.quadrature} | {args.steps} | {n_captions} | {tokens} "
                        f"| {route} | "
                        f"{seconds:.1f} | {seconds / forward:.0f} | {diff} |"
                    )
        print(f"\n{name}: one image forward {forward * 1000:.0f} ms CPU")


if __name__ == "__main__":
    main()
