"""Write the web page's example scenes: service/web/static/examples/scene-N.png and examples.json.

    python scripts/make_examples.py

Deterministic (fixed seed), so re-running it reproduces the committed files byte for byte; a test checks
that the committed ones still match the generator. Each example names one phrase the page highlights
after explaining, with the object's box.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from attribution.evaluation.scenes import Scene, iter_scenes

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "service" / "web" / "static" / "examples"
SEED = 2024


def _distinct(scene: Scene) -> bool:
    """Every object has its own colour and its own shape, so each phrase has one right place."""
    objs = scene.objects
    return len({o.colour for o in objs}) == len({o.shape for o in objs}) == len(objs)


# One example per rule, in page order.
RULES: list[Callable[[Scene], bool]] = [
    lambda s: len(s.objects) == 2 and _distinct(s),
    lambda s: len(s.objects) == 3 and _distinct(s),
    lambda s: len(s.objects) == 1,
    lambda s: len(s.objects) == 3 and _distinct(s) and s.caption.startswith("there is"),
]


def pick_examples(seed: int = SEED) -> list[Scene]:
    stream = iter_scenes(seed)
    picked: list[Scene] = []
    for rule in RULES:
        picked.append(next(s for s in stream if rule(s)))
    return picked


def example_entries(scenes: list[Scene]) -> list[dict]:
    entries = []
    for k, scene in enumerate(scenes, start=1):
        first = min(range(len(scene.objects)), key=lambda i: scene.objects[i].span[0])
        phrases = [
            {"text": scene.phrase(i), "start": o.span[0], "end": o.span[1], "box": list(o.box)}
            for i, o in sorted(enumerate(scene.objects), key=lambda io: io[1].span[0])
        ]
        entries.append(
            {
                "file": f"scene-{k}.png",
                "caption": scene.caption,
                "highlight": scene.phrase(first),
                "phrases": phrases,
            }
        )
    return entries


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = pick_examples()
    entries = example_entries(scenes)
    for scene, entry in zip(scenes, entries, strict=True):
        scene.image.save(args.out / entry["file"], format="PNG", optimize=True)
    (args.out / "examples.json").write_text(json.dumps({"seed": SEED, "examples": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} examples to {args.out}")


if __name__ == "__main__":
    main()
