"""Held-out retrieval accuracy of a CLIP on scenes, through the serving path (load_model, transform).

    python scripts/eval_scenes.py                      # the shipped exclip-scenes, 256 held-out scenes
    python scripts/eval_scenes.py --pretrained runs/scenes/best.pt --n 256
    python scripts/eval_scenes.py --model exclip-scenes-siglip

The default seed is the training script's held-out seed (scenes it never trained on); the metrics are
defined in attribution/evaluation/retrieval.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attribution.evaluation.retrieval import retrieval_accuracy
from attribution.evaluation.scenes import HELD_OUT_SEED, generate_scenes
from attribution.models import SCENES_MODEL, load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SCENES_MODEL)
    ap.add_argument("--pretrained", default="scenes")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.pretrained)
    scenes = generate_scenes(args.n, args.seed, image_size=loaded.image_size[0])
    started = time.perf_counter()
    pixels = torch.stack([loaded.transform(s.image) for s in scenes])
    acc = retrieval_accuracy(loaded.model, loaded.tokenizer, pixels, scenes)
    print(f"{args.model} ({args.pretrained}), {args.n} scenes, seed {args.seed}:")
    for key, value in acc.items():
        print(f"  {key:12s} {value:.4f}")
    print(f"  ({time.perf_counter() - started:.1f} s)")
    print(json.dumps(acc))


if __name__ == "__main__":
    main()
