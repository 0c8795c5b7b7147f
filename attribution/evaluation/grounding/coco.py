"""COCO-format annotations (a captions file plus an instances file) as grounding samples.

Captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
instances: ``{"annotations": [{"image_id", "category_id", "bbox": [x, y, w, h]}], "categories":
[{"id", "name"}]}`` (COCO's own ``captions_*.json`` and ``instances_*.json``). Boxes become
(x, y, x + w, y + h) in original pixels.

How a phrase is found: for every category with at least one box in the image, its name or one of its
words in ``SYNONYMS`` is searched in the caption as a whole word, case-insensitive, with an optional
plural ending (``s``/``es``); the first occurrence is the phrase and all boxes of that category in the
image are its boxes. Longer names are matched first and a span already taken is not reused (``hot dog``
is not also a ``dog``). Categories the caption does not name are skipped, and so are captions that name
none. The group of a phrase is its category name.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.samples import BoxCoords, GroundingSample, Phrase

# Words that name a category in captions although they are not its COCO name.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person",
        "people",
        "man",
        "men",
        "woman",
        "women",
        "boy",
        "girl",
        "child",
        "children",
        "kid",
        "player",
        "guy",
        "lady",
    ),
    "motorcycle": ("motorcycle", "motorbike"),
    "airplane": ("airplane", "plane", "jet"),
    "couch": ("couch", "sofa"),
    "tv": ("tv", "television"),
    "cell phone": ("cell phone", "phone", "cellphone"),
    "dining table": ("dining table", "table"),
}


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AnnotationError(f"cannot read the COCO {what} file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"COCO {what} file {path} has no 'annotations' list")
    return data


def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})(?:e?s)?\b", re.IGNORECASE)


def find_phrases(caption: str, boxes_by_category: dict[str, list[BoxCoords]]) -> tuple[Phrase, ...]:
    """The phrases of ``caption`` by the rule above, in caption order."""
    taken: list[tuple[int, int]] = []
    phrases = []
    for name in sorted(boxes_by_category, key=len, reverse=True):
        words = SYNONYMS.get(name, (name,))
        for m in _pattern(words).finditer(caption):
            if not any(m.start() < end and start < m.end() for start, end in taken):
                taken.append((m.start(), m.end()))
                phrases.append(Phrase((m.start(), m.end()), tuple(boxes_by_category[name]), name))
                break
    return tuple(sorted(phrases, key=lambda p: p.span))


def read_coco(
    captions_file: str | Path, instances_file: str | Path, images_dir: str | Path, limit: int | None = None
) -> list[GroundingSample]:
    """One sample per caption that names at least one boxed category of its image (see module doc)."""
    captions = _load_json(Path(captions_file), "captions")
    instances = _load_json(Path(instances_file), "instances")
    try:
        names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        files = {int(i["id"]): str(i["file_name"]) for i in captions["images"]}
        boxes: dict[int, dict[str, list[BoxCoords]]] = defaultdict(lambda: defaultdict(list))
        for ann in instances["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w > 0 and h > 0:
                boxes[int(ann["image_id"])][names[int(ann["category_id"])]].append((x, y, x + w, y + h))
        samples: list[GroundingSample] = []
        for ann in captions["annotations"]:
            image_id, caption = int(ann["image_id"]), str(ann["caption"]).strip()
            phrases = find_phrases(caption, boxes.get(image_id, {}))
            if not phrases:
                continue
            if image_id not in files:
                raise AnnotationError(f"caption of image {image_id} but no such entry in 'images'")
            sample_id = f"coco-{image_id}-{ann.get('id', len(samples))}"
            samples.append(GroundingSample(sample_id, Path(images_dir) / files[image_id], caption, phrases))
            if limit is not None and len(samples) >= limit:
                break
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"COCO annotations are malformed: {type(e).__name__}: {e}") from e
    return samples
