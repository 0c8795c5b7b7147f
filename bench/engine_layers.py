"""The engine's cost at every layer, in image forwards of the same model measured in the same process.

For each model (random weights, seed 0) and each block index ``l`` (text and image layer both ``l``),
one explanation of one image and a 16-token caption is timed and divided by the fastest of three plain
image forward passes of the same model measured just before it. Times are CPU seconds of this process
(``time.process_time``): on a machine shared with other busy processes wall time mostly measures the
others. Run with ``OMP_NUM_THREADS=1`` so that spinning threads do not inflate it. A row is the best
of ``--repeats`` calls after a warm-up; when the warm-up took over 20 CPU s it is the measurement
(it includes the references' hidden states, at most two forwards).

    python bench/engine_layers.py                                  # ViT-B-32 and ViT-B-16, N = 1 and 10
    python bench/engine_layers.py --models ViT-B-32 --steps 10 --layers 8 9 10 11

Layers run from the last block down. Cost grows as the layer goes down (each block between the cut
and the last one carries S dense tangents), so ``--max-seconds`` stops a value of N at the first
layer whose call took longer than that, and the table says which rows were not measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import torch
from common import line_buffered_stdout

from attribution.explainer import Explainer
from testing import random_clip

CAPTION = "a photo of a brown dog with a red ball on the green grass"  # 16 tokens with SOT, EOT


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
        if times[-1] > 20:
            break
    return min(times)


def forward_seconds(encode_image: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> float:
    with torch.no_grad():
        encode_image(image)
        return best_seconds(lambda: encode_image(image), 3)


def main() -> None:
    line_buffered_stdout()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--layers", nargs="+", type=int, help="block indices (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    print("| model | layer | steps N | CPU seconds | image forward CPU s | cost in image forwards |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model, tokenizer, image = random_clip(name)
        n_layers = len(model.visual.transformer.resblocks)
        layers = args.layers if args.layers is not None else list(range(n_layers))
        too_slow: set[int] = set()
        for layer in sorted(layers, reverse=True):
            for steps in args.steps:
                if steps in too_slow:
                    skipped = f"not run (a later layer took > {args.max_seconds:.0f} s)"
                    print(f"| {name} | {layer} | {steps} | {skipped} | | |")
                    continue
                explainer = Explainer(model, tokenizer, layer, layer, steps)
                forward = forward_seconds(model.encode_image, image)
                call = functools.partial(explainer.explain, image, [CAPTION])
                seconds = best_seconds(call, 1)  # warm-up: references cached per model
                if seconds < 20:  # slower calls: the warm-up is the measurement (references ≤ 2 forwards)
                    seconds = best_seconds(call, args.repeats)
                if seconds > args.max_seconds:
                    too_slow.add(steps)
                cost = seconds / forward
                print(f"| {name} | {layer} | {steps} | {seconds:.2f} | {forward:.3f} | {cost:.1f} |")


if __name__ == "__main__":
    main()
