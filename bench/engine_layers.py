"""The engine's cost at every layer, in image forwards of the same model measured in the same process.

For each model (random weights, seed 0) and each block index ``l`` (text and image layer both ``l``),
one explanation of one image and a 16-token caption is timed (best of ``--repeats`` calls after a
warm-up; one call when a call takes over 20 s) and divided by the fastest of three plain image forward
passes measured just before it, so that the machine's momentary speed cancels.

    python bench/engine_layers.py                                  # ViT-B-32 and ViT-B-16, N = 1 and 10
    python bench/engine_layers.py --models ViT-B-32 --steps 10 --layers 8 9 10 11

``--max-seconds`` skips a row whose predicted time (from the same layer at the smaller N, linear in N)
exceeds it, and says so in the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import open_clip
import torch

from attribution.explainer import Explainer

CAPTION = "a photo of a brown dog with a red ball on the green grass"  # 16 tokens with SOT, EOT


def best_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if times[-1] > 20:
            break
    return min(times)


def forward_seconds(model: torch.nn.Module, image: torch.Tensor) -> float:
    with torch.no_grad():
        model.encode_image(image)
        return best_seconds(lambda: model.encode_image(image), 3)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured
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
    print("| model | layer | steps N | seconds | image forward s | cost in image forwards |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None).eval()
        tokenizer = open_clip.get_tokenizer(name)
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        n_layers = len(model.visual.transformer.resblocks)
        layers = args.layers if args.layers is not None else list(range(n_layers))
        for layer in reversed(layers):
            measured: dict[int, float] = {}
            for steps in sorted(args.steps):
                if measured:
                    n0 = max(measured)
                    predicted = measured[n0] * steps / n0
                    if predicted > args.max_seconds:
                        print(f"| {name} | {layer} | {steps} | skipped: predicted {predicted:.0f} s | | |",
                              flush=True)
                        continue
                explainer = Explainer(model, tokenizer, layer, layer, steps)
                forward = forward_seconds(model, image)
                explainer.explain(image, [CAPTION])  # warm-up: references cached per model
                seconds = best_seconds(lambda e=explainer, x=image: e.explain(x, [CAPTION]), args.repeats)
                measured[steps] = seconds
                cost = seconds / forward
                print(f"| {name} | {layer} | {steps} | {seconds:.2f} | {forward:.3f} | {cost:.1f} |")


if __name__ == "__main__":
    main()
