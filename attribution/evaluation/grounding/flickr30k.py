"""Flickr30k Entities annotations as grounding samples.

``Sentences/<image id>.txt``: one caption per line with phrases marked ``[/EN#<entity>/<type>... text]``;
``Annotations/<image id>.xml``: ``<object>`` elements naming one or more entities (``<name>``) with a
``<bndbox>`` (xmin, ymin, xmax, ymax: 1-based, inclusive, so the box is (xmin − 1, ymin − 1, xmax,
ymax) in end-exclusive pixels) or ``<nobndbox>``. Images are ``<images_dir>/<image id>.jpg``.

Each caption is a sample whose phrases are its marked phrases with at least one box (``notvisual``
phrases and entities without a box are skipped); all boxes of the entity count. The caption is the
line without the markup; the group of a phrase is its first entity type (``people``, ``clothing``, ...).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.samples import BoxCoords, GroundingSample, Phrase

_MARKUP = re.compile(r"\[/EN#(\d+)((?:/[^\s\]/]+)+) ([^\]]*)\]")


def parse_sentence(line: str) -> tuple[str, list[tuple[tuple[int, int], str, tuple[str, ...]]]]:
    """The plain caption and its phrases: (span in the plain caption, entity id, types)."""
    parts: list[str] = []
    phrases = []
    length = pos = 0
    for m in _MARKUP.finditer(line):
        before = line[pos : m.start()]
        parts.append(before)
        length += len(before)
        text = m.group(3)
        phrases.append(((length, length + len(text)), m.group(1), tuple(m.group(2).strip("/").split("/"))))
        parts.append(text)
        length += len(text)
        pos = m.end()
    parts.append(line[pos:])
    return "".join(parts), phrases


def parse_boxes(xml_path: Path) -> dict[str, list[BoxCoords]]:
    """Boxes per entity id of one annotation file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        raise AnnotationError(f"cannot read Flickr30k Entities annotation {xml_path}: {e}") from e
    boxes: dict[str, list[BoxCoords]] = defaultdict(list)
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        try:
            # A missing tag gives None, and float(None) raises the TypeError caught below.
            texts = [box.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")]
            xmin, ymin, xmax, ymax = (float(v) for v in texts)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{xml_path}: a <bndbox> lacks a number: {e}") from e
        for name in obj.findall("name"):
            boxes[(name.text or "").strip()].append((xmin - 1, ymin - 1, xmax, ymax))
    return boxes


def read_flickr30k(
    root: str | Path, images_dir: str | Path, limit: int | None = None
) -> list[GroundingSample]:
    """Samples of every ``root/Sentences/*.txt`` with its ``root/Annotations/*.xml`` (sorted by id)."""
    sentences_dir, annotations_dir = Path(root) / "Sentences", Path(root) / "Annotations"
    if not sentences_dir.is_dir() or not annotations_dir.is_dir():
        raise AnnotationError(f"{root} must contain the folders Sentences/ and Annotations/")
    samples: list[GroundingSample] = []
    for sentence_file in sorted(sentences_dir.glob("*.txt")):
        image_id = sentence_file.stem
        boxes = parse_boxes(annotations_dir / f"{image_id}.xml")
        for n, line in enumerate(sentence_file.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            caption, marked = parse_sentence(line.strip())
            phrases = tuple(
                Phrase(span, tuple(boxes[entity]), types[0])
                for span, entity, types in marked
                if boxes.get(entity) and "notvisual" not in types
            )
            if phrases:
                image = Path(images_dir) / f"{image_id}.jpg"
                samples.append(GroundingSample(f"flickr-{image_id}-{n}", image, caption, phrases))
                if limit is not None and len(samples) >= limit:
                    return samples
    return samples
