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

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from attribution.errors import AttributionError
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.files import (
    MAX_SENTENCES_BYTES,
    MAX_XML_BYTES,
    confined_image,
    decode_utf8,
    read_limited,
)
from attribution.evaluation.grounding.samples import (
    BoxCoords,
    GroundingSample,
    InvalidSample,
    Phrase,
    invalid,
)
from attribution.text import MAX_CAPTION_CHARS

_OPEN = "[/EN#"
# A marked-up line is its caption plus about 30 characters of markup per phrase; beyond this it cannot
# hold a caption of MAX_CAPTION_CHARS, and is refused before it is parsed.
MAX_LINE_CHARS = 4 * MAX_CAPTION_CHARS
Marked = tuple[tuple[int, int], str, tuple[str, ...]]


def _ends(line: str, stop: str) -> list[int]:
    """For each position, the first position at or after it whose character is whitespace or ``stop``."""
    ends = [len(line)] * (len(line) + 1)
    for i in range(len(line) - 1, -1, -1):
        ends[i] = i if line[i] == stop or line[i].isspace() else ends[i + 1]
    return ends


def _markup(line: str) -> list[tuple[int, int, str, tuple[str, ...], int, int]]:
    r"""Each ``[/EN#<digits>/<type>[/<type>...] <text>]``: (start, end, entity, types, text start, text end).

    Leftmost first, not overlapping; in time linear in the line (a line is data from elsewhere): every
    candidate is checked in constant time against tables built in one pass. The grammar is
    ``\[/EN#(\d+)((?:/[^\s\]/]+)+) ([^\]]*)\]``: the types run up to the first whitespace or ``]``,
    must be a single space after them, and hold no empty type.
    """
    found: list[tuple[int, int, str, tuple[str, ...], int, int]] = []
    header_end = _ends(line, "]")  # where the types stop
    digits_end = [len(line)] * (len(line) + 1)
    slashes = [0] * (len(line) + 1)  # slashes[i]: how many "//" start before i
    for i in range(len(line) - 1, -1, -1):
        digits_end[i] = digits_end[i + 1] if line[i].isdecimal() else i
    for i in range(len(line)):
        slashes[i + 1] = slashes[i] + (line.startswith("//", i))
    start = line.find(_OPEN)
    while start >= 0:
        d0 = start + len(_OPEN)
        d1 = digits_end[d0]
        h = header_end[d1] if d1 < len(line) else len(line)
        header_ok = (
            d1 > d0
            and line.startswith("/", d1)
            and h < len(line)
            and line[h] == " "
            and h - d1 >= 2
            and line[h - 1] != "/"
            and slashes[h - 1] - slashes[d1] == 0
        )
        if header_ok:
            close = line.find("]", h + 1)
            if close < 0:  # no "]" after this one: none can close a later one either
                break
            types = tuple(line[d1 + 1 : h].split("/"))
            found.append((start, close + 1, line[d0:d1], types, h + 1, close))
            start = line.find(_OPEN, close + 1)
        else:
            start = line.find(_OPEN, start + 1)
    return found


def parse_sentence(line: str) -> tuple[str, list[Marked]]:
    """The plain caption and its phrases: (span in the plain caption, entity id, types)."""
    parts: list[str] = []
    phrases: list[Marked] = []
    length = pos = 0
    for start, end, entity, types, text_start, text_end in _markup(line):
        before = line[pos:start]
        parts.append(before)
        length += len(before)
        text = line[text_start:text_end]
        phrases.append(((length, length + len(text)), entity, types))
        parts.append(text)
        length += len(text)
        pos = end
    parts.append(line[pos:])
    return "".join(parts), phrases


def parse_boxes(xml_path: Path) -> dict[str, list[BoxCoords]]:
    """Boxes per entity id of one annotation file."""
    data = read_limited(xml_path, MAX_XML_BYTES, "Flickr30k Entities annotation")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, RecursionError) as e:
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


def read_sentences(path: Path) -> list[str]:
    """The lines of one sentence file (UTF-8, capped in size)."""
    data = read_limited(path, MAX_SENTENCES_BYTES, "Flickr30k Entities sentence file")
    return decode_utf8(data, path, "Flickr30k Entities sentence file").splitlines()


def read_flickr30k(
    root: str | Path,
    images_dir: str | Path,
    limit: int | None = None,
    *,
    skipped: list[InvalidSample] | None = None,
) -> list[GroundingSample]:
    """Samples of every ``root/Sentences/*.txt`` with its ``root/Annotations/*.xml`` (sorted by id).

    A caption that cannot be a sample (too long, an empty phrase, a box that is empty or not finite)
    and an image whose sentence or annotation file cannot be read raise an error naming them, or are
    recorded in ``skipped`` when one is given (an image's files as the sample ``flickr-<id>``).
    """
    sentences_dir, annotations_dir = Path(root) / "Sentences", Path(root) / "Annotations"
    if not sentences_dir.is_dir() or not annotations_dir.is_dir():
        raise AnnotationError(f"{root} must contain the folders Sentences/ and Annotations/")
    images = Path(images_dir)
    samples: list[GroundingSample] = []
    for sentence_file in sorted(sentences_dir.glob("*.txt")):
        image_id = sentence_file.stem
        try:
            boxes = parse_boxes(annotations_dir / f"{image_id}.xml")
            lines = read_sentences(sentence_file)
            image = images / f"{image_id}.jpg"
            confined_image(images, image.name)
        except AttributionError as e:
            invalid(f"flickr-{image_id}", e, skipped)
            continue
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            sample_id = f"flickr-{image_id}-{n}"
            try:
                sample = _sample(sample_id, line.strip(), boxes, image, images)
            except AttributionError as e:
                invalid(f"{sample_id} ({sentence_file.name}, line {n + 1})", e, skipped)
                continue
            if sample is not None:
                samples.append(sample)
                if limit is not None and len(samples) >= limit:
                    return samples
    return samples


def _sample(
    sample_id: str, line: str, boxes: dict[str, list[BoxCoords]], image: Path, images: Path
) -> GroundingSample | None:
    """The sample of one marked-up line, None if no phrase has a box, or an error saying why it cannot be."""
    if len(line) > MAX_LINE_CHARS:
        raise AnnotationError(f"the line has {len(line)} characters, more than {MAX_LINE_CHARS}")
    caption, marked = parse_sentence(line)
    if len(caption) > MAX_CAPTION_CHARS:
        raise AnnotationError(f"the caption has {len(caption)} characters, more than {MAX_CAPTION_CHARS}")
    phrases = tuple(
        Phrase(span, tuple(boxes[entity]), types[0])
        for span, entity, types in marked
        if boxes.get(entity) and "notvisual" not in types
    )
    return GroundingSample(sample_id, image, caption, phrases, image_root=images) if phrases else None
