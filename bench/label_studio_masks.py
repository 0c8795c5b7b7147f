"""What turning heatmaps into Label Studio regions costs on a large image: brush mask RLE and its box.

The backend's post-processing of one ``/predict`` task: for every phrase, the mask of the patches whose
heatmap reaches ``mask_level`` times the phrase's maximum (``heatmap_mask``), then its brush RLE and the
rectangle around it (``image_regions``), for the label config the README shows. The heatmaps are seeded
random patch grids placed on the original image as the model's centre crop places them; no model runs.
For each image size, grid, mask level and phrase count the table gives the CPU seconds of the whole
task, the peak of Python's allocations during it (``tracemalloc``, a second pass: it slows the code)
and the total RLE length.

    OMP_NUM_THREADS=1 python bench/label_studio_masks.py
    OMP_NUM_THREADS=1 python bench/label_studio_masks.py --sizes 6324x6324 --grids 8 --phrases 64
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

import numpy as np
from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from attribution.geometry import ImageGeometry
from service.label_studio.config import EXAMPLE_CONFIG, LabelConfig, parse_label_config
from service.label_studio.results import heatmap_mask, image_regions


def image_object(width: int, height: int, grid: int) -> ImageGeometry:
    """A result's image geometry for a centre-cropped square model input of ``grid`` x ``grid`` patches."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return ImageGeometry(
        width, height, (x0, y0, x0 + side, y0 + side), (grid, grid), (side / grid, side / grid)
    )


def one_task(config: LabelConfig, heatmaps: np.ndarray, image: ImageGeometry, level: float) -> int:
    """The regions of every phrase of one task; returns the total RLE length."""
    total = 0
    for heatmap in heatmaps:
        for region in image_regions(config, heatmap_mask(heatmap, image, level), image):
            total += len(region["value"].get("rle", []))
    return total


def measure(width: int, height: int, grid: int, level: float, phrases: int) -> dict[str, Any]:
    config = parse_label_config(EXAMPLE_CONFIG)
    image = image_object(width, height, grid)
    heatmaps = np.random.default_rng(0).standard_normal((phrases, grid, grid))
    start = time.process_time()
    rle = one_task(config, heatmaps, image, level)
    cpu = time.process_time() - start
    tracemalloc.start()
    one_task(config, heatmaps, image, level)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"cpu_s": cpu, "peak_mib": peak / 2**20, "rle": rle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--sizes", default="6324x6324,7300x5475", help="WIDTHxHEIGHT, comma-separated")
    parser.add_argument("--grids", default="8,14", help="patch grids (exclip-scenes 8, ViT-B-16 14)")
    parser.add_argument("--levels", default="0.5,1e-300", help="mask levels (1e-300: every positive patch)")
    parser.add_argument("--phrases", default="1,64", help="phrases per task (64: EXCLIP_MAX_SELECTIONS)")
    args = parser.parse_args(argv)
    print("| image | grid | mask_level | phrases | CPU s | peak MiB (tracemalloc) | RLE values |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        for grid in (int(g) for g in args.grids.split(",")):
            for level in (float(v) for v in args.levels.split(",")):
                for phrases in (int(p) for p in args.phrases.split(",")):
                    row = measure(width, height, grid, level, phrases)
                    print(
                        f"| {width}x{height} | {grid}x{grid} | {level:g} | {phrases} | {row['cpu_s']:.3f} "
                        f"| {row['peak_mib']:.1f} | {row['rle']} |"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
