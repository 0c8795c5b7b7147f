"""Where the grounding benchmark's pointing misses land, on generated scenes (issue 14).

For every object phrase of held-out scenes, the phrase's interaction heatmap (the benchmark's
``interactions`` method) is scored by the centre rule and its highest patch classified:

- hit: the patch's centre lies in the object's box;
- edge: a miss on a patch that overlaps the object's box (its centre lies outside);
- other object: a miss on a patch that overlaps another object of the scene (binding);
- elsewhere: any other miss (background).

Tables: hits by object size and number of objects; the kinds of miss by number of objects; on edge
misses, how much of the peak patch the box covers and how high the best-covered patch of the object
scores against the peak.

    python bench/grounding_misses.py --n 200 --layers 1/1
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import common  # noqa: F401  (puts the repository on sys.path)
import torch

from attribution.grounding.benchmark import batches
from attribution.grounding.methods import MethodOptions
from attribution.grounding.methods.interactions import Interactions
from attribution.grounding.metrics import argmax_patch, pointing_hit, union_cover
from attribution.grounding.samples import from_scene
from attribution.models import load_model
from attribution.scenes import SIZES, generate_scenes

HELD_OUT_SEED = 2_000_003  # the grounding benchmark's default held-out set
KINDS = ("hit", "edge", "other object", "elsewhere")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--layers", default="1/1", help="TEXT/IMAGE layer pair")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    text_layer, image_layer = (int(v) for v in args.layers.split("/"))

    loaded = load_model("exclip-scenes", "scenes")
    scenes = generate_scenes(args.n, args.seed)
    samples = [from_scene(scene, i) for i, scene in enumerate(scenes)]
    method = Interactions(MethodOptions(steps=args.steps))

    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    kinds: dict[int, Counter[str]] = defaultdict(Counter)
    edge_cover, edge_ratio = [], []
    done = 0
    for batch in batches(loaded, samples, args.batch_size):
        maps = method.heatmaps(loaded, batch, text_layer, image_layer)
        for per_phrase, geometry in zip(maps, batch.geometries, strict=True):
            scene = scenes[done]
            done += 1
            covers = [union_cover(geometry, [o.box]) for o in scene.objects]
            for k, (heatmap, obj) in enumerate(zip(per_phrase, scene.objects, strict=True)):
                n = len(scene.objects)
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


def print_tables(
    hits: dict[tuple[str, int], list[bool]],
    kinds: dict[int, Counter[str]],
    edge_cover: list[float],
    edge_ratio: list[float],
    args: argparse.Namespace,
) -> None:
    counts = sorted(kinds)
    print(f"exclip-scenes, {args.n} scenes of seed {args.seed}, layers {args.layers}, {args.steps} steps")
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
