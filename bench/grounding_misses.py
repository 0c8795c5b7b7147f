"""Where the grounding benchmark's pointing misses land, on generated scenes.

For every object phrase of held-out scenes, the phrase's interaction heatmap (the benchmark's
``interactions`` method) is scored by the centre rule and its highest patch classified:

- hit: the patch's centre lies in the object's box;
- edge: a miss on a patch that overlaps the object's box (its centre lies outside);
- other object: a miss on a patch that overlaps another object of the scene (binding);
- elsewhere: any other miss (background).

Tables: hits by object size and number of objects; the kinds of miss by number of objects; on edge
misses, how much of the peak patch the box covers and how high the best-covered patch of the object
scores against the peak; and the pointing game of each phrase's colour word and shape word read out
alone (from the same computation) beside the whole phrase. ``--pretrained`` scores other weights of the
same architecture (a fine-tuning run's ``best.pt``).

    python bench/grounding_misses.py --n 200 --layers 1/1
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import torch

from attribution.evaluation.grounding.metrics import argmax_patch, pointing_hit, union_cover
from attribution.evaluation.scenes import GROUNDING_SEED, SIZES, Scene, SceneObject, generate_scenes
from attribution.models import load_model
from attribution.pipeline import ExplainRequest, SelectionResult, explain_requests
from attribution.selections import Span

KINDS = ("hit", "edge", "other object", "elsewhere")
READOUTS = ("phrase", "colour word", "shape word")  # the spans scored per object, in this order


def readout_spans(scene: Scene, obj: SceneObject) -> list[Span]:
    """The object's whole phrase, then its colour word and its shape word."""
    start, end = obj.span
    phrase = scene.caption[start:end]
    spans = [Span(start, end)]
    for word in (obj.colour, obj.shape):
        at = start + f" {phrase} ".index(f" {word} ")  # whole words: the phrase has no repeated word
        spans.append(Span(at, at + len(word)))
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=GROUNDING_SEED)
    ap.add_argument("--layers", default="1/1", help="TEXT/IMAGE layer pair")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pretrained", default="scenes", help="tag or checkpoint path (the shipped weights)")
    args = ap.parse_args()
    text_layer, image_layer = (int(v) for v in args.layers.split("/"))

    loaded = load_model("exclip-scenes", args.pretrained)
    scenes = generate_scenes(args.n, args.seed)

    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    readout_hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    kinds: dict[int, Counter[str]] = defaultdict(Counter)
    edge_cover, edge_ratio = [], []
    for b0 in range(0, len(scenes), args.batch_size):
        chunk = scenes[b0 : b0 + args.batch_size]
        requests = [
            ExplainRequest(s.image, [s.caption], [[sp for o in s.objects for sp in readout_spans(s, o)]])
            for s in chunk
        ]
        explained = explain_requests(
            loaded, requests, text_layer=text_layer, image_layer=image_layer, steps=args.steps
        )
        for (explanation,), scene in zip(explained, chunk, strict=True):
            geometry = explanation.geometry
            maps = [_heatmap(sel) for sel in explanation.selections]  # READOUTS per object, in order
            covers = [union_cover(geometry, [o.box]) for o in scene.objects]
            n = len(scene.objects)
            for k, obj in enumerate(scene.objects):
                for readout, readout_map in zip(READOUTS, maps[3 * k : 3 * k + 3], strict=True):
                    readout_hits[(readout, n)].append(pointing_hit(readout_map, geometry, [obj.box]))
                heatmap = maps[3 * k]
                row, col = argmax_patch(heatmap)
                hit = pointing_hit(heatmap, geometry, [obj.box])
                hits[(obj.size, n)].append(hit)
                if hit:
                    kind = "hit"
                elif covers[k][row, col] > 0:
                    kind = "edge"
                    edge_cover.append(float(covers[k][row, col]))
                    best = divmod(int(covers[k].argmax()), covers[k].shape[1])
                    edge_ratio.append(float(heatmap[best] / heatmap[row, col]))
                elif any(c[row, col] > 0 for j, c in enumerate(covers) if j != k):
                    kind = "other object"
                else:
                    kind = "elsewhere"
                kinds[n][kind] += 1
    print_tables(hits, kinds, edge_cover, edge_ratio, args)
    print_readouts(readout_hits, sorted(kinds))


def _heatmap(selection: SelectionResult) -> torch.Tensor:
    assert selection.heatmap is not None  # span selections always carry one
    return selection.heatmap.float()


def print_readouts(readout_hits: dict[tuple[str, int], list[bool]], counts: list[int]) -> None:
    print("\nPointing game (centre rule) of each readout:\n")
    print("| readout | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in counts) + " | all |")
    print("|---|" + "---|" * (len(counts) + 1))
    for readout in READOUTS:
        cells = [readout_hits[(readout, n)] for n in counts]
        every = [h for c in cells for h in c]
        print(f"| {readout} | " + " | ".join(f"{sum(c) / len(c):.3f}" for c in [*cells, every]) + " |")


def print_tables(
    hits: dict[tuple[str, int], list[bool]],
    kinds: dict[int, Counter[str]],
    edge_cover: list[float],
    edge_ratio: list[float],
    args: argparse.Namespace,
) -> None:
    counts = sorted(kinds)
    print(
        f"exclip-scenes ({args.pretrained}), {args.n} scenes of seed {args.seed}, layers {args.layers},"
        f" {args.steps} steps"
    )
    print("\nPointing game (centre rule) by object size:\n")
    print("| size | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for size in SIZES:
        cells = []
        for n in counts:
            h = hits.get((size, n), [])
            cells.append(f"{sum(h) / len(h):.3f} ({sum(h)}/{len(h)})" if h else "-")
        print(f"| {size} | " + " | ".join(cells) + " |")
    print("\nWhere the highest patch lies, phrases:\n")
    print("| objects | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for n in counts:
        print(f"| {n} | " + " | ".join(str(kinds[n][k]) for k in KINDS) + " |")
    if edge_cover:
        print(
            f"\nEdge misses ({len(edge_cover)}): the box covers a median {_median(edge_cover):.2f} of the"
            f" peak patch; the object's best-covered patch scores a median {_median(edge_ratio):.2f}"
            " of the peak."
        )


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


if __name__ == "__main__":
    main()
