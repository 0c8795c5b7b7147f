"""A captioned-scenes world where the truth is known: coloured shapes on a noisy background.

Each scene is a small RGB image with 1–3 non-overlapping objects (a shape in a colour and a size at a
random position) and a caption that names every object ("a small red circle and a blue square"), with
each object's box in pixels and the character span of its phrase in the caption. Everything is drawn
from a seeded ``numpy`` generator, so ``generate_scenes(n, seed)`` returns the same scenes on every
machine. ``swapped_captions`` gives the hard negatives that only a model which binds colours and shapes
to the right object can reject: the same caption with colours (or shapes) exchanged between two objects.

The vocabulary has no word starting with a vowel, so the article is always "a" and a swapped phrase
never changes the words around it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Pure-ish hues, well away from the low-saturation background; each object jitters its colour a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 55),
    "blue": (40, 75, 225),
    "yellow": (230, 205, 35),
}
# Side length of the object's box in pixels for a 64-pixel image (scaled with image_size), inclusive.
SIZES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (19, 24)}
MAX_OBJECTS = 3

# The scene sets with a role, so a set used to choose something is never taken as a fresh one.
HELD_OUT_SEED = 1_000_003  # the training curve's held-out set (the shipped checkpoint was chosen on it)
GROUNDING_SEED = 2_000_003  # the grounding benchmark's default set (the default layers were chosen on it)

# Caption templates: "{}" is the object list ("a red circle, a small blue square and a green triangle").
TEMPLATES: tuple[str, ...] = (
    "{}",
    "a picture of {}",
    "there is {}",
    "an image with {}",
    "{} on a noisy background",
)
_SIZE_MENTION_P = 0.5  # how often a phrase names its object's size ("small red circle" vs "red circle")
_MARGIN = 2  # minimum gap in pixels between two objects' boxes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, end-exclusive
    span: tuple[int, int]  # [start, end) characters of this object's phrase in the caption


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str
    objects: tuple[SceneObject, ...]

    def phrase(self, i: int) -> str:
        """The caption text of object ``i``'s phrase ("small red circle")."""
        start, end = self.objects[i].span
        return self.caption[start:end]


@dataclass(frozen=True)
class SwappedCaptions:
    """Hard negatives for a scene: the caption with two objects' colours (shapes) exchanged.

    ``None`` where no two objects differ in that attribute (one object, or all the same colour).
    """

    colour: str | None
    shape: str | None


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation textured background: a smooth random field plus pixel noise, (size, size, 3)."""
    base = rng.uniform(80, 170)
    tint = rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 18, size=(size // 8 + 2, size // 8 + 2, 1))
    dx, dy = rng.integers(0, 8, size=2)  # so that the texture's cells do not line up with the patches
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[dy : dy + size, dx : dx + size]
    noise = rng.normal(0, 10, size=(size, size, 3))
    return np.clip(base + tint + smooth + noise, 0, 255)


def _place(rng: np.random.Generator, sides: list[int], image_size: int) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of the given sides, inside the image and at least _MARGIN apart."""
    placed: list[tuple[int, int, int, int]] = []
    for side in sides:
        for _ in range(50):
            x0 = int(rng.integers(0, image_size - side + 1))
            y0 = int(rng.integers(0, image_size - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, other) for other in placed):
                placed.append(box)
                break
        else:
            return None
    return [(b[0], b[1]) for b in placed]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return (
        a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1]
    )


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]
) -> None:
    x0, y0, x1, y1 = box  # end-exclusive; PIL's shape coordinates are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _phrase(colour: str, shape: str, size: str, with_size: bool) -> str:
    return f"{size} {colour} {shape}" if with_size else f"{colour} {shape}"


def _join(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """'a X', 'a X and a Y', 'a X, a Y and a Z' with each phrase's [start, end) span."""
    text, spans = "", []
    for i, phrase in enumerate(phrases):
        if i:
            text += " and " if i == len(phrases) - 1 else ", "
        text += "a "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return text, spans


def _caption(template: str, phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    listing, spans = _join(phrases)
    offset = template.index("{}")
    caption = template.format(listing)
    return caption, [(s + offset, e + offset) for s, e in spans]


def _scene(rng: np.random.Generator, n_objects: int | None, image_size: int) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    scale = image_size / 64
    while True:
        shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n)]
        colours = [list(COLOURS)[i] for i in rng.integers(0, len(COLOURS), size=n)]
        sizes = [list(SIZES)[i] for i in rng.integers(0, len(SIZES), size=n)]
        sides = [max(3, round(int(rng.integers(SIZES[s][0], SIZES[s][1] + 1)) * scale)) for s in sizes]
        corners = _place(rng, sides, image_size)
        if corners is not None:
            break
    pixels = _background(rng, image_size)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    boxes = []
    for shape, colour, side, (x0, y0) in zip(shapes, colours, sides, corners, strict=True):
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        box = (x0, y0, x0 + side, y0 + side)
        _draw(draw, shape, box, fill)
        boxes.append(box)
    order = rng.permutation(n)  # the caption names the objects in random order
    with_size = rng.random(n) < _SIZE_MENTION_P
    template = TEMPLATES[int(rng.integers(0, len(TEMPLATES)))]
    phrases = [_phrase(colours[i], shapes[i], sizes[i], bool(with_size[i])) for i in order]
    caption, spans = _caption(template, phrases)
    span_of = {int(i): span for i, span in zip(order, spans, strict=True)}
    objects = tuple(SceneObject(shapes[i], colours[i], sizes[i], boxes[i], span_of[i]) for i in range(n))
    return Scene(image=image, caption=caption, objects=objects)


def iter_scenes(seed: int, *, n_objects: int | None = None, image_size: int = 64) -> Iterator[Scene]:
    """An endless deterministic stream of scenes; ``generate_scenes(n, seed)`` is its first ``n``."""
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    while True:
        yield _scene(rng, n_objects, image_size)


def generate_scenes(n: int, seed: int, *, n_objects: int | None = None, image_size: int = 64) -> list[Scene]:
    """``n`` scenes, the same for the same arguments. ``n_objects=None`` draws 1–3 objects per scene."""
    stream = iter_scenes(seed, n_objects=n_objects, image_size=image_size)
    return [next(stream) for _ in range(n)]


def caption_phrases(caption: str) -> list[tuple[str | None, str | None, str]]:
    """The (size or None, colour, shape) of each object a caption of this world names, in order."""
    phrases: list[tuple[str | None, str | None, str]] = []
    size: str | None = None
    colour: str | None = None
    for word in caption.replace(",", " ").split():
        if word in SIZES:
            size = word
        elif word in COLOURS:
            colour = word
        elif word in SHAPES:
            phrases.append((size, colour, word))
            size, colour = None, None
    return phrases


def describes(caption: str, scene: Scene) -> bool:
    """Whether ``caption`` is a true and complete description of ``scene``: one phrase per object, each
    with the object's colour and shape (and size, where the phrase names one). Template and order are free,
    so "there is a red circle" describes every scene whose only object is a red circle."""
    phrases = caption_phrases(caption)
    if len(phrases) != len(scene.objects):
        return False

    def fits(phrase: tuple[str | None, str | None, str], obj: SceneObject) -> bool:
        size, colour, shape = phrase
        return colour == obj.colour and shape == obj.shape and size in (None, obj.size)

    return any(
        all(fits(phrase, scene.objects[k]) for phrase, k in zip(phrases, order, strict=True))
        for order in itertools.permutations(range(len(scene.objects)))
    )


def _swap(scene: Scene, attribute: str, rng: np.random.Generator | None) -> str | None:
    vocabulary = COLOURS if attribute == "colour" else SHAPES
    phrases = [scene.phrase(k).split(" ") for k in range(len(scene.objects))]

    def swapped(i: int, j: int) -> str:
        value_i, value_j = (next(w for w in phrases[k] if w in vocabulary) for k in (i, j))
        new = [list(p) for p in phrases]
        new[i] = [value_j if w in vocabulary else w for w in phrases[i]]
        new[j] = [value_i if w in vocabulary else w for w in phrases[j]]
        caption = scene.caption
        for k in sorted(range(len(phrases)), key=lambda k: scene.objects[k].span[0], reverse=True):
            start, end = scene.objects[k].span
            caption = caption[:start] + " ".join(new[k]) + caption[end:]
        return caption

    # A swap is a negative only if it makes the caption false: exchanging the shapes of a red circle and
    # a red square says the same thing again, and so can a swap between phrases that leave sizes unsaid.
    candidates = [swapped(i, j) for i in range(len(phrases)) for j in range(i + 1, len(phrases))]
    candidates = [c for c in candidates if not describes(c, scene)]
    if not candidates:
        return None
    return candidates[0] if rng is None else candidates[int(rng.integers(0, len(candidates)))]


def swapped_captions(scene: Scene, rng: np.random.Generator | None = None) -> SwappedCaptions:
    """The scene's caption with colours, and separately shapes, exchanged between two objects.

    The pair is the first (in object order) that differs in the attribute, or a random such pair when
    ``rng`` is given (training). Sizes and the template stay, so only the binding differs.
    """
    return SwappedCaptions(colour=_swap(scene, "colour", rng), shape=_swap(scene, "shape", rng))


def replaced_caption(scene: Scene, attribute: str, rng: np.random.Generator) -> str | None:
    """The caption with one object's colour (or shape) replaced by another that makes it false.

    A negative for every scene, single objects included: "a red square" for a red circle. ``None`` if
    no replacement is false (cannot happen in this world, but checked).
    """
    vocabulary = list(COLOURS) if attribute == "colour" else list(SHAPES)
    k = int(rng.integers(0, len(scene.objects)))
    start, end = scene.objects[k].span
    words = scene.caption[start:end].split(" ")
    old = next(w for w in words if w in vocabulary)
    for new in rng.permutation([v for v in vocabulary if v != old]):
        phrase = " ".join(str(new) if w == old else w for w in words)
        caption = scene.caption[:start] + phrase + scene.caption[end:]
        if not describes(caption, scene):
            return caption
    return None
