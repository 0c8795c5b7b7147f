"""The captioned-scenes world: deterministic, geometrically honest, spans and hard negatives exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.evaluation.scenes import (
    COLOURS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    Scene,
    caption_phrases,
    describes,
    generate_scenes,
    iter_scenes,
    replaced_caption,
    swapped_captions,
)


def _words(scene: Scene, i: int) -> list[str]:
    return scene.phrase(i).split(" ")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(300, seed=7)


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = generate_scenes(20, 3), generate_scenes(20, 3), generate_scenes(20, 4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.objects for s in a] == [s.objects for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [s.caption for s in a] != [s.caption for s in c]


def test_generate_is_the_start_of_the_stream():
    stream = iter_scenes(11)
    first = [next(stream) for _ in range(5)]
    assert [s.caption for s in first] == [s.caption for s in generate_scenes(5, 11)]


def test_images_are_rgb_of_the_requested_size(scenes):
    assert all(s.image.mode == "RGB" and s.image.size == (64, 64) for s in scenes)
    big = generate_scenes(3, 0, image_size=96)
    assert all(s.image.size == (96, 96) for s in big)


def test_object_counts_cover_one_to_three_and_can_be_fixed(scenes):
    assert {len(s.objects) for s in scenes} == set(range(1, MAX_OBJECTS + 1))
    assert all(len(s.objects) == 2 for s in generate_scenes(30, 1, n_objects=2))
    with pytest.raises(ValueError):
        generate_scenes(1, 0, n_objects=MAX_OBJECTS + 1)


def test_boxes_inside_the_image_and_apart(scenes):
    for s in scenes:
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                overlap_x = min(a.box[2], b.box[2]) > max(a.box[0], b.box[0])
                overlap_y = min(a.box[3], b.box[3]) > max(a.box[1], b.box[1])
                assert not (overlap_x and overlap_y), (a.box, b.box)


def test_box_holds_the_object_in_its_colour(scenes):
    """The object's pixels lie inside its box: its colour dominates the box, not the rest of the image."""
    for s in scenes[:100]:
        pixels = np.asarray(s.image).astype(int)
        for o in s.objects:
            target = np.array(COLOURS[o.colour])
            close = np.abs(pixels - target).max(axis=-1) <= 16  # the generator jitters each channel ±15
            x0, y0, x1, y1 = o.box
            inside = close[y0:y1, x0:x1].mean()
            assert inside > 0.4, (s.caption, o)  # a triangle fills half its box
            # The box is tight: each of its edge rows/columns touches the object.
            box = close[y0:y1, x0:x1]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()


def test_larger_objects_are_larger(scenes):
    sides = {
        size: [o.box[2] - o.box[0] for s in scenes for o in s.objects if o.size == size] for size in SIZES
    }
    assert max(sides["small"]) < min(sides["large"])


def test_spans_point_at_each_objects_phrase(scenes):
    for s in scenes:
        spans = sorted(o.span for o in s.objects)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint, ordered
        for i, o in enumerate(s.objects):
            words = _words(s, i)
            assert words[-1] == o.shape and o.colour in words
            assert words in ([o.colour, o.shape], [o.size, o.colour, o.shape])
            assert s.caption[o.span[0] - 2 : o.span[0]] == "a "  # every phrase follows its article
        # Nothing in the caption names an object that is not in the scene.
        named = [w for w in s.caption.replace(",", " ").split() if w in SHAPES]
        assert sorted(named) == sorted(o.shape for o in s.objects)


def test_captions_vary_in_template_and_order(scenes):
    assert len({s.caption.split(" a ")[0] for s in scenes}) >= 4
    two = [s for s in scenes if len(s.objects) == 2]
    first_named = [min(range(2), key=lambda i: s.objects[i].span[0]) for s in two]
    assert 0 < sum(first_named) < len(two)  # the caption does not always follow the object order


def _described(caption: str) -> list[tuple[str, ...]]:
    """The multiset of (size?, colour, shape) phrases a caption names."""
    words = caption.replace(",", " ").split()
    phrases, current = [], []
    for w in words:
        if w in SIZES or w in COLOURS:
            current.append(w)
        elif w in SHAPES:
            phrases.append((*current, w))
            current = []
    return sorted(phrases)


def test_swapped_captions_exchange_exactly_one_attribute(scenes):
    seen = {"colour": 0, "shape": 0}
    for s in scenes:
        swaps = swapped_captions(s)
        for attr, text in (("colour", swaps.colour), ("shape", swaps.shape)):
            if text is None:
                continue
            seen[attr] += 1
            assert text != s.caption
            assert _described(text) != _described(s.caption)  # says something else
            vocab = COLOURS if attr == "colour" else SHAPES
            # Same words except the attribute; the attribute's multiset is preserved (a swap).
            old, new = s.caption.replace(",", " ").split(), text.replace(",", " ").split()
            assert len(old) == len(new)
            changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
            assert len(changed) == 2 and all(a in vocab and b in vocab for a, b in changed)
            assert changed[0] == changed[1][::-1]
    assert seen["colour"] > 50 and seen["shape"] > 50


def test_no_swap_when_it_would_say_the_same(scenes):
    for s in scenes:
        swaps = swapped_captions(s)
        if len(s.objects) == 1:
            assert (swaps.colour, swaps.shape) == (None, None)
        if len({o.colour for o in s.objects}) == 1:
            assert swaps.colour is None
        if len({o.shape for o in s.objects}) == 1:
            assert swaps.shape is None


def test_random_swaps_choose_among_valid_pairs(scenes):
    rng = np.random.default_rng(0)
    three = [s for s in scenes if len(s.objects) == 3 and swapped_captions(s).colour]
    variants = {swapped_captions(s, rng).colour for s in three[:5] for _ in range(10)}
    assert len(variants) > 5
    for s in three[:20]:
        assert _described(swapped_captions(s, rng).colour) != _described(s.caption)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([None, 1, 2, 3]), size=st.sampled_from([32, 64, 80]))
def test_any_seed_gives_a_valid_scene(seed, n, size):
    (s,) = generate_scenes(1, seed, n_objects=n, image_size=size)
    assert s.image.size == (size, size)
    for i, o in enumerate(s.objects):
        assert 0 <= o.box[0] < o.box[2] <= size and 0 <= o.box[1] < o.box[3] <= size
        assert _words(s, i)[-1] == o.shape


def test_every_caption_describes_its_scene_and_no_swap_does(scenes):
    for s in scenes:
        assert describes(s.caption, s)
        swaps = swapped_captions(s)
        assert not any(describes(t, s) for t in (swaps.colour, swaps.shape) if t)


def test_describes_is_about_content_not_wording():
    (s,) = [x for x in generate_scenes(200, 3) if len(x.objects) == 2 and _distinct(x)][:1]
    a, b = s.objects

    def phrase(o, with_size=False):
        return f"{o.size} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"

    assert describes(f"there is a {phrase(b, True)} and a {phrase(a)}", s)  # other template, order, sizes
    assert not describes(f"a {phrase(a)}", s)  # incomplete
    assert not describes(f"a {phrase(a)}, a {phrase(b)} and a {phrase(a)}", s)  # too many
    wrong_size = "large" if a.size == "small" else "small"
    assert not describes(f"a {wrong_size} {a.colour} {a.shape} and a {phrase(b)}", s)
    assert caption_phrases("a small red circle, a blue square and a large green triangle") == [
        ("small", "red", "circle"),
        (None, "blue", "square"),
        ("large", "green", "triangle"),
    ]


def _distinct(s: Scene) -> bool:
    return len({o.colour for o in s.objects}) == len({o.shape for o in s.objects}) == len(s.objects)


def test_replaced_captions_change_one_word_and_are_false(scenes):
    rng = np.random.default_rng(1)
    for s in scenes[:100]:
        for attr, vocab in (("shape", SHAPES), ("colour", COLOURS)):
            text = replaced_caption(s, attr, rng)
            assert text is not None and not describes(text, s)
            changed = [(a, b) for a, b in zip(s.caption.split(), text.split(), strict=True) if a != b]
            assert len(changed) == 1 and all(w.strip(",") in vocab for w in changed[0])
