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

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from attribution.errors import AttributionError
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.files import confined_image, read_json
from attribution.evaluation.grounding.samples import (
    BoxCoords,
    GroundingSample,
    InvalidSample,
    Phrase,
    invalid,
)
from attribution.text import MAX_CAPTION_CHARS

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
    data = read_json(path, f"COCO {what} file")
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
    captions_file: str | Path,
    instances_file: str | Path,
    images_dir: str | Path,
    limit: int | None = None,
    *,
    skipped: list[InvalidSample] | None = None,
) -> list[GroundingSample]:
    """One sample per caption that names at least one boxed category of its image (see module doc).

    A caption that cannot be a sample (too long, an image ``file_name`` outside ``images_dir``, a box
    that is not finite) raises an error naming it, or is recorded in ``skipped`` when one is given.
    Files that are not COCO annotations raise in any case.
    """
    captions = _load_json(Path(captions_file), "captions")
    instances = _load_json(Path(instances_file), "instances")
    root = Path(images_dir)
    try:
        names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        files = {int(i["id"]): str(i["file_name"]) for i in captions["images"]}
        boxes: dict[int, dict[str, list[BoxCoords]]] = defaultdict(lambda: defaultdict(list))
        for ann in instances["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w > 0 and h > 0:  # COCO's degenerate boxes (and NaN sizes) mark nothing to point at
                boxes[int(ann["image_id"])][names[int(ann["category_id"])]].append((x, y, x + w, y + h))
        samples: list[GroundingSample] = []
        for n, ann in enumerate(captions["annotations"]):
            image_id, caption = int(ann["image_id"]), str(ann["caption"]).strip()
            sample_id = f"coco-{image_id}-{ann.get('id', n)}"
            try:
                sample = _sample(sample_id, caption, boxes.get(image_id, {}), files.get(image_id), root)
            except AttributionError as e:
                invalid(sample_id, e, skipped)
                continue
            if sample is not None:
                samples.append(sample)
                if limit is not None and len(samples) >= limit:
                    break
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as e:
        raise AnnotationError(f"COCO annotations are malformed: {type(e).__name__}: {e}") from e
    return samples


def _sample(
    sample_id: str,
    caption: str,
    boxes_by_category: dict[str, list[BoxCoords]],
    file_name: str | None,
    root: Path,
) -> GroundingSample | None:
    """The sample of one caption, None if it names no boxed category, or an error saying why it cannot be."""
    if len(caption) > MAX_CAPTION_CHARS:
        raise AnnotationError(f"the caption has {len(caption)} characters, more than {MAX_CAPTION_CHARS}")
    phrases = find_phrases(caption, boxes_by_category)
    if not phrases:
        return None
    if file_name is None:
        raise AnnotationError("a caption of an image that has no entry in 'images'")
    confined_image(root, file_name)
    return GroundingSample(sample_id, root / file_name, caption, phrases, image_root=root)
