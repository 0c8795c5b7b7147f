"""The one typed home of grounding data: an image, its caption, and phrases linked to boxes.

A phrase is a character span of the caption with one or more boxes (original pixels, x0, y0, x1, y1,
end-exclusive, as :class:`attribution.ImageGeometry` uses them) and a ``group``, the key the benchmark
tables are broken down by (number of objects in the scene, COCO category, Flickr30k entity type).
Readers of the dataset formats live in their own modules and all return ``GroundingSample`` lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from attribution.decode import decode_image
from attribution.errors import AttributionError
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.files import check_image_file, read_image_bytes

if TYPE_CHECKING:
    from attribution.evaluation.scenes import Scene

BoxCoords = tuple[float, float, float, float]


@dataclass(frozen=True)
class Phrase:
    """Characters ``span`` = [start, end) of the caption, grounded in ``boxes`` (any of them counts)."""

    span: tuple[int, int]
    boxes: tuple[BoxCoords, ...]
    group: str

    def __post_init__(self) -> None:
        start, end = self.span
        if not 0 <= start < end:
            raise AnnotationError(f"phrase span {self.span} is empty or negative")
        if not self.boxes:
            raise AnnotationError(f"phrase span {self.span} has no box")
        for x0, y0, x1, y1 in self.boxes:
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise AnnotationError(f"box {(x0, y0, x1, y1)} has a coordinate that is not a finite number")
            if not (x0 < x1 and y0 < y1):
                raise AnnotationError(f"box {(x0, y0, x1, y1)} is empty: need x0 < x1 and y0 < y1")


@dataclass(frozen=True)
class GroundingSample:
    """One captioned image. ``image`` is a decoded image or the path of a file to decode when needed;
    a path read from annotations must stay inside ``image_root`` (checked when read, symlinks resolved)."""

    id: str
    image: Image.Image | Path
    caption: str
    phrases: tuple[Phrase, ...]
    image_root: Path | None = None

    def __post_init__(self) -> None:
        for phrase in self.phrases:
            if phrase.span[1] > len(self.caption):
                raise AnnotationError(
                    f"sample {self.id}: phrase span {phrase.span} is outside the caption "
                    f"({len(self.caption)} characters)"
                )

    def phrase_text(self, index: int) -> str:
        start, end = self.phrases[index].span
        return self.caption[start:end]

    def load_image(self) -> Image.Image:
        """The image as upright RGB; files are decoded with the library's checks (formats, pixel cap)."""
        if isinstance(self.image, Image.Image):
            return self.image if self.image.mode == "RGB" else self.image.convert("RGB")
        try:
            return decode_image(read_image_bytes(Path(self.image), self.image_root))
        except AttributionError as e:
            raise AnnotationError(f"sample {self.id}: {e}") from e

    def check_image(self) -> None:
        """Raise now what ``load_image`` would for a missing, oversized or misplaced file (not decoding)."""
        if isinstance(self.image, Path):
            try:
                check_image_file(self.image, self.image_root)
            except AnnotationError as e:
                raise AnnotationError(f"sample {self.id}: {e}") from e


@dataclass(frozen=True)
class InvalidSample:
    """A sample left out of a run, and why."""

    id: str
    reason: str


def invalid(sample_id: str, error: AttributionError, skipped: list[InvalidSample] | None) -> None:
    """Record the bad sample in ``skipped``, or, without such a list, raise an error naming it."""
    if skipped is None:
        raise AnnotationError(f"invalid sample {sample_id}: {error}") from error
    skipped.append(InvalidSample(sample_id, str(error)))


def from_scene(scene: Scene, index: int) -> GroundingSample:
    """A sample from one ``scenes.Scene``; phrases grouped by the scene's number of objects."""
    group = f"{len(scene.objects)} object" + ("s" if len(scene.objects) != 1 else "")
    phrases = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        phrases.append(Phrase(obj.span, ((float(x0), float(y0), float(x1), float(y1)),), group))
    return GroundingSample(f"scene-{index}", scene.image, scene.caption, tuple(phrases))
