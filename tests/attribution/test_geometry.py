"""ImageGeometry and transform_geometry: patches placed where the model's transform puts them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw
from torchvision.transforms import CenterCrop, Compose, RandomResizedCrop, Resize

from attribution.decode import decode_image
from attribution.errors import InvalidSelection, UnsupportedModel
from attribution.images import preprocess
from attribution.selections import Box, box_patch_weights
from tests.attribution.image_uploads import encode

# ---------------------------------------------------------------- helpers


def variant(loaded, size=(32, 32), resize_mode="shortest", patch=8):
    """The tiny model with another open_clip preprocessing (only transform and geometry fields matter)."""
    transform = image_transform_v2(PreprocessCfg(size=size, resize_mode=resize_mode), is_train=False)
    return dataclasses.replace(
        loaded,
        transform=transform,
        image_size=size,
        patch_size=(patch, patch),
        grid=(size[0] // patch, size[1] // patch),
    )


def marker_centroid(image: Image.Image, box: tuple[int, int, int, int], loaded) -> tuple[float, float]:
    """Where a white block drawn at ``box`` (original pixels, inclusive) on black ``image`` lands in the
    model input, as (u, v) model-input pixels."""
    marked = image.copy()
    ImageDraw.Draw(marked).rectangle(box, fill=(255, 255, 255))
    with_marker, _ = preprocess(marked, loaded)
    without = loaded.transform(Image.new("RGB", (1, 1), (0, 0, 0)))[:, :1, :1]  # black, normalised
    diff = (with_marker - without).mean(0).clamp(min=0)  # bicubic ringing below 0 is dropped
    rows, cols = diff.shape
    vs, us = torch.meshgrid(torch.arange(rows) + 0.5, torch.arange(cols) + 0.5, indexing="ij")
    total = diff.sum()
    assert total > 0, "marker vanished"
    return float((diff * us).sum() / total), float((diff * vs).sum() / total)


def to_input(geometry, x: float, y: float, loaded) -> tuple[float, float]:
    """Original-pixel point -> model-input coordinates, from the geometry alone."""
    x0, y0, x1, y1 = geometry.crop_box
    h, w = loaded.image_size
    return (x - x0) / (x1 - x0) * w, (y - y0) / (y1 - y0) * h


def patch_of_point(geometry, x: float, y: float) -> tuple[int, int]:
    rows, cols = geometry.grid
    hits = [
        (r, c)
        for r in range(rows)
        for c in range(cols)
        if geometry.patch_box(r, c)[0] <= x < geometry.patch_box(r, c)[2]
        and geometry.patch_box(r, c)[1] <= y < geometry.patch_box(r, c)[3]
    ]
    assert len(hits) == 1
    return hits[0]


# ---------------------------------------------------------------- geometry

SIZES = [(640, 480), (480, 640), (20, 12), (12, 20), (1000, 100), (33, 31), (32, 32)]
VARIANTS = [
    ((32, 32), "shortest", 8),  # exclip-tiny's own
    ((224, 224), "shortest", 16),  # ViT-B-16 style
    ((32, 48), "shortest", 8),  # non-square model input: ResizeKeepRatio + CenterCrop
    ((32, 32), "squash", 8),
    ((32, 32), "longest", 8),  # resize long side, pad the rest
]


@pytest.mark.parametrize(("size", "mode", "patch"), VARIANTS)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_markers_land_where_the_geometry_predicts(tiny_model, size, mode, patch, width, height):
    loaded = variant(tiny_model, size, mode, patch)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    tensor, geometry = preprocess(image, loaded)
    assert tensor.shape == (3, *size) and tensor.dtype == torch.float32
    assert (geometry.width, geometry.height) == (width, height) and geometry.grid == loaded.grid
    x0, y0, x1, y1 = geometry.crop_box
    scale = max((x1 - x0) / size[1], (y1 - y0) / size[0])  # original pixels per input pixel
    k = max(1, round(1.5 * scale))  # marker about one input pixel wide
    rows, cols = geometry.grid
    points = [(0.5, 0.5), (0.3, 0.6), (0.8, 0.35)]  # fractions of the image, then of some patches
    boxes = [(0.0, 0.0, width, height)] + [
        geometry.patch_box(r, c) for r, c in {(0, 0), (rows // 2, cols // 3), (rows - 1, cols - 1)}
    ]
    checked = 0
    for bx0, by0, bx1, by1 in boxes:
        for fx, fy in points:
            px, py = int(bx0 + fx * (bx1 - bx0) - k / 2), int(by0 + fy * (by1 - by0) - k / 2)
            cx, cy = px + k / 2, py + k / 2  # marker centre, original pixels
            eu, ev = to_input(geometry, cx, cy, loaded)
            inside_image = px >= 0 and py >= 0 and px + k <= width and py + k <= height
            margin = 2 + k / scale / 2  # input pixels: half the marker, plus the resampling kernel
            if not (inside_image and margin <= eu <= size[1] - margin and margin <= ev <= size[0] - margin):
                continue  # in the padding, or near the crop edge where resampling clips the marker
            u, v = marker_centroid(image, (px, py, px + k - 1, py + k - 1), loaded)
            assert abs(u - eu) < 0.5 and abs(v - ev) < 0.5, (u, v, eu, ev)
            checked += 1
            if min(eu % patch, patch - eu % patch, ev % patch, patch - ev % patch) < 0.5:
                continue  # on a patch border: the patch is ambiguous
            # ... and it lands in the patch the geometry names
            row, col = patch_of_point(geometry, cx, cy)
            assert (int(v // patch), int(u // patch)) == (row, col)
            weights = box_patch_weights(Box(cx - 0.25, cy - 0.25, cx + 0.25, cy + 0.25), geometry)
            assert divmod(int(weights.argmax()), cols) == (row, col)
    assert checked >= 2


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_image_geometry(tiny_model, orientation):
    upright = Image.new("RGB", (300, 200), (0, 0, 0))
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode_image(encode(stored, "PNG", exif=exif.tobytes()))
    _, geometry = preprocess(image, tiny_model)
    assert (geometry.width, geometry.height) == (300, 200)  # upright, landscape
    assert geometry.crop_box == pytest.approx((50.0, 0.0, 250.0, 200.0), abs=1.0)
    u, v = marker_centroid(image, (200, 40, 209, 49), tiny_model)
    eu, ev = to_input(geometry, 205, 45, tiny_model)
    assert abs(u - eu) < 0.5 and abs(v - ev) < 0.5


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(640, 480, "shortest"), (480, 640, "shortest"), (20, 12, "shortest"), (640, 480, "longest")],
)
def test_patch_boxes_round_trip(tiny_model, width, height, mode):
    _, geometry = preprocess(Image.new("RGB", (width, height)), variant(tiny_model, (32, 32), mode))
    rows, cols = geometry.grid
    pw, ph = geometry.patch_size
    for r in range(rows):
        for c in range(cols):
            box = geometry.patch_box(r, c)
            assert box[2] - box[0] == pytest.approx(pw) and box[3] - box[1] == pytest.approx(ph)
            inside = (max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height))
            expected = torch.zeros(rows, cols)
            expected[r, c] = (inside[2] - inside[0]) * (inside[3] - inside[1]) / (pw * ph)
            if expected[r, c] > 0:
                assert torch.allclose(box_patch_weights(Box(*box), geometry), expected, atol=1e-5)
    # the patches tile the crop box exactly
    assert geometry.patch_box(0, 0)[:2] == pytest.approx(geometry.crop_box[:2])
    assert geometry.patch_box(rows - 1, cols - 1)[2:] == pytest.approx(geometry.crop_box[2:])


def test_box_weights_are_covered_fractions(tiny_model):
    _, geometry = preprocess(Image.new("RGB", (320, 320)), tiny_model)  # patches of 80x80 pixels
    assert geometry.patch_size == (80.0, 80.0) and geometry.crop_box == (0.0, 0.0, 320.0, 320.0)
    w = box_patch_weights(Box(40, 0, 200, 80), geometry)
    assert w[0].tolist() == [0.5, 1.0, 0.5, 0.0] and w[1:].abs().sum() == 0
    w = box_patch_weights(Box(-100, -100, 1000, 1000), geometry)  # clipped to the image
    assert torch.equal(w, torch.ones(4, 4))
    # letterboxed: patches reaching into the padding only count their part inside the image
    _, boxed = preprocess(Image.new("RGB", (320, 160)), variant(tiny_model, (32, 32), "longest"))
    assert boxed.crop_box == pytest.approx((0.0, -80.0, 320.0, 240.0))
    w = box_patch_weights(Box(0, 0, 320, 160), boxed)
    assert w[:, 0].tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0])


def test_patch_box_out_of_grid(tiny_model):
    _, geometry = preprocess(Image.new("RGB", (64, 64)), tiny_model)
    with pytest.raises(InvalidSelection, match="outside the 4x4 grid"):
        geometry.patch_box(4, 0)


def test_to_dict(tiny_model):
    _, geometry = preprocess(Image.new("RGB", (640, 480)), tiny_model)
    d = json.loads(json.dumps(geometry.to_dict()))
    assert d == {
        "width": 640,
        "height": 480,
        "crop_box": pytest.approx([640 / 42 * 5, 0.0, 640 / 42 * 37, 480.0]),
        "patch_size": pytest.approx([640 / 42 * 8, 120.0]),
        "grid": {"rows": 4, "cols": 4},
    }


def test_unknown_transform_step_is_refused(tiny_model):
    odd = dataclasses.replace(tiny_model, transform=Compose([RandomResizedCrop(32)]))
    with pytest.raises(UnsupportedModel, match="RandomResizedCrop"):
        preprocess(Image.new("RGB", (64, 64)), odd)


def test_two_resizes_are_not_understood(tiny_model):
    odd = dataclasses.replace(tiny_model, transform=Compose([Resize(64), Resize(32), CenterCrop(32)]))
    with pytest.raises(UnsupportedModel, match="expected one resize, then one centre crop"):
        preprocess(Image.new("RGB", (64, 64)), odd)
