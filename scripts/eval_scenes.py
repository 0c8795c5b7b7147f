"""Held-out retrieval accuracy of a CLIP on scenes, through the serving path (load_model, transform).

    python scripts/eval_scenes.py                      # the shipped exclip-scenes, 256 held-out scenes
    python scripts/eval_scenes.py --pretrained runs/scenes/best.pt --n 256
    python scripts/eval_scenes.py --model exclip-scenes-siglip

A model the engine cannot explain yet (``unsupported_reason``: ``load_model`` refuses it) is built the
way ``load_model`` builds it below that check (open_clip with the packaged or given weights, the model
card's tokenizer, the eval transform), and the output says so.

The default seed is the training script's held-out seed (scenes it never trained on); the metrics are
defined in attribution/evaluation/retrieval.py.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from attribution.evaluation.retrieval import retrieval_accuracy
from attribution.evaluation.scenes import HELD_OUT_SEED, generate_scenes
from attribution.models import (
    MODEL_CARDS,
    SCENES_MODEL,
    WEIGHTS_DIR,
    ModelCard,
    get_tokenizer,
    load_model,
    unsupported_reason,
)


def build(name: str, pretrained: str) -> tuple[Any, Any, Callable[[Any], torch.Tensor]]:
    """(model, tokenizer, image transform): through load_model, or below its check where it refuses."""
    reason = unsupported_reason(open_clip.get_model_config(name))
    if reason is None:
        loaded = load_model(name, pretrained)
        return loaded.model, loaded.tokenizer, loaded.transform
    print(f"note: not through load_model, which refuses {name} for now ({reason})")
    packaged = MODEL_CARDS.get(name, ModelCard()).weights.get(pretrained)
    weights = str(WEIGHTS_DIR / packaged) if packaged else pretrained
    model = open_clip.create_model(name, pretrained=weights).eval()
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model, get_tokenizer(name), transform


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SCENES_MODEL)
    ap.add_argument("--pretrained", default="scenes")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, transform = build(args.model, args.pretrained)
    scenes = generate_scenes(args.n, args.seed, image_size=model.visual.image_size[0])
    started = time.perf_counter()
    pixels = torch.stack([transform(s.image) for s in scenes])
    acc = retrieval_accuracy(model, tokenizer, pixels, scenes)
    print(f"{args.model} ({args.pretrained}), {args.n} scenes, seed {args.seed}:")
    for key, value in acc.items():
        print(f"  {key:12s} {value:.4f}")
    print(f"  ({time.perf_counter() - started:.1f} s)")
    print(json.dumps(acc))


if __name__ == "__main__":
    main()
