"""preprocess and prepare_image: the model's own transform, cropped first, a band at a time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from attribution import decode
from attribution.decode import ALPHA_BACKGROUND, decode_image, decode_scaled, image_size
from attribution.errors import InvalidImage
from attribution.images import prepare_image, preprocess
from testing import spy_conversions
from tests.attribution.image_uploads import BAND_UPLOADS, encode, noise, with_exif


def test_preprocess_uses_the_models_own_transform(tiny_model):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    tensor, _ = preprocess(image, tiny_model)
    assert torch.equal(tensor, tiny_model.transform(image))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # non-RGB input gets the decode_image rules
    tensor, _ = preprocess(rgba, tiny_model)
    assert torch.allclose(tensor, tiny_model.transform(Image.new("RGB", (40, 40), ALPHA_BACKGROUND)))


# ---------------------------------------------------------------- crop before resize (issue 10)

TRANSFORM_CASES = [
    ((224, 224), "shortest", "bicubic"),
    ((224, 224), "longest", "bicubic"),
    ((224, 224), "squash", "bilinear"),
    ((224, 160), "shortest", "bicubic"),  # non-square input: open_clip's ResizeKeepRatio path
    ((32, 32), "shortest", "bicubic"),
]
IMAGE_SIZES = [(640, 480), (480, 640), (33, 17), (1000, 1000), (301, 199), (225, 3000)]


def with_transform(loaded, size, resize_mode, interpolation):
    cfg = PreprocessCfg(size=size, resize_mode=resize_mode, interpolation=interpolation)
    patch = 16 if size[0] % 16 == 0 and size[1] % 16 == 0 else 8
    return dataclasses.replace(
        loaded,
        transform=image_transform_v2(cfg, is_train=False),
        image_size=size,
        patch_size=(patch, patch),
        grid=(size[0] // patch, size[1] // patch),
    )


@pytest.mark.parametrize(("size", "mode", "interpolation"), TRANSFORM_CASES)
def test_preprocess_equals_the_open_clip_transform(tiny_model, size, mode, interpolation):
    loaded = with_transform(tiny_model, size, mode, interpolation)
    normalize = loaded.transform.transforms[-1]
    one_level = 1 / 255 / min(normalize.std)  # one 8-bit step after normalisation
    rng = np.random.default_rng(11)
    for width, height in IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, _ = preprocess(image, loaded)
        theirs = loaded.transform(image)
        diff = (ours - theirs).abs()
        # Same sampling points and filter; the scale is computed in another order, so a value sitting
        # on a rounding boundary may land one 8-bit level away (measured: at most 0.2% of values).
        assert float(diff.max()) <= one_level + 1e-6, (width, height)
        assert float((diff > 0).float().mean()) < 0.01, (width, height)


class _SizeSpy:
    """Records the size of every image Pillow resizes to or creates while active."""

    def __init__(self, monkeypatch):
        self.sizes: list[tuple[int, int]] = []
        resize, new = Image.Image.resize, Image.new

        def spy_resize(img, size, *args, **kwargs):
            self.sizes.append(tuple(size))
            return resize(img, size, *args, **kwargs)

        def spy_new(mode, size, *args, **kwargs):
            self.sizes.append(tuple(size))
            return new(mode, size, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "resize", spy_resize)
        monkeypatch.setattr(Image, "new", spy_new)


@pytest.mark.parametrize(("width", "height"), [(100, 1600), (1600, 100), (3000, 2000)])
@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_no_intermediate_image_is_larger_than_the_model_input(tiny_model, monkeypatch, width, height, mode):
    # The transform itself resizes the whole image first: 100x1600 -> 32x512 for a 32x32 input.
    loaded = with_transform(tiny_model, (32, 32), mode, "bicubic")
    image = Image.new("RGB", (width, height), (90, 120, 30))
    spy = _SizeSpy(monkeypatch)
    tensor, _ = preprocess(image, loaded)
    assert tensor.shape == (3, 32, 32)
    assert spy.sizes and max(w * h for w, h in spy.sizes) <= 32 * 32


@pytest.mark.parametrize(("width", "height"), [(1, 250_000), (250_000, 1), (17, 1), (1, 1700)])
def test_too_elongated_images_are_refused_with_the_rule(tiny_model, width, height):
    long, short = max(width, height), min(width, height)
    with pytest.raises(InvalidImage, match=r"long side exceeds 16 times their short side") as e:
        preprocess(Image.new("RGB", (width, height)), tiny_model)
    assert f"{width}x{height} pixels" in str(e.value) and f"{long / short:.4g}:1" in str(e.value)
    data = encode(Image.new("L", (width, height), 128))
    with pytest.raises(InvalidImage, match="16 times"):  # from the header, before decoding
        prepare_image(data, tiny_model)


def test_aspect_ratio_limit_is_a_parameter(tiny_model):
    tensor, geometry = preprocess(Image.new("RGB", (16, 1)), tiny_model)  # exactly 16:1 is allowed
    assert tensor.shape == (3, 32, 32) and geometry.crop_box == pytest.approx((7.5, 0.0, 8.5, 1.0))
    with pytest.raises(InvalidImage, match="exceeds 4 times"):
        preprocess(Image.new("RGB", (50, 10)), tiny_model, max_aspect_ratio=4)
    data = encode(Image.new("RGB", (200, 10)))
    assert prepare_image(data, tiny_model, max_aspect_ratio=20).tensor.shape == (3, 32, 32)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_prepare_image_equals_decode_then_preprocess_for_normal_images(tiny_model, fmt):
    loaded = with_transform(tiny_model, (224, 224), "shortest", "bicubic")
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((640, 480))
    data = encode(photo, fmt)
    prepared = prepare_image(data, loaded)
    tensor, geometry = preprocess(decode_image(data), loaded)
    assert torch.equal(prepared.tensor, tensor)  # 640x480 is too small to be drafted
    assert prepared.geometry == geometry


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_at_a_reduced_scale(tiny_model, monkeypatch, orientation):
    # 4000x3000 -> 298x224 for ViT-B/16 wants >= 4x that: decoded at 1/2 scale (2000x1500)
    loaded = with_transform(tiny_model, (224, 224), "shortest", "bicubic")
    rng = np.random.default_rng(8)
    # a photo-like 4000x3000 image: smooth at the scale of a few pixels, like a real photo
    photo = Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).resize((4000, 3000))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo, "JPEG", quality=92, exif=exif.tobytes())
    full, geometry = preprocess(decode_image(data), loaded)
    spy = _SizeSpy(monkeypatch)
    prepared = prepare_image(data, loaded)
    assert prepared.geometry == geometry
    assert (geometry.width, geometry.height) == ((4000, 3000) if orientation == 1 else (3000, 4000))
    assert max(w * h for w, h in spy.sizes) <= 224 * 224
    one_level = 1 / 255 / min(loaded.transform.transforms[-1].std)
    diff = (prepared.tensor - full).abs()
    assert not torch.equal(prepared.tensor, full)  # it was drafted
    # DCT-domain downscaling is a slightly different filter. Measured on this image: mean 0.13, max
    # 1.0 levels (0.37 / 2.8 with 4x finer detail); limits with a 3x margin on this image's numbers.
    assert float(diff.mean()) < 0.4 * one_level and float(diff.max()) < 3 * one_level
    exact = prepare_image(data, loaded, draft_oversampling=0)  # drafting off: the transform exactly
    assert torch.equal(exact.tensor, full)


@pytest.mark.parametrize("mode", ["L", "1", "I;16", "F"])
def test_greyscale_is_resized_in_one_channel_with_the_same_result(tiny_model, mode):
    loaded = with_transform(tiny_model, (224, 224), "shortest", "bicubic")
    rng = np.random.default_rng(2)
    grey = Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).resize((400, 300))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(grey).astype(np.float32) / 7.0 - 3.0)
    else:
        image = grey.convert(mode)
    data = encode(image, "TIFF" if mode == "F" else "PNG")
    tensor, geometry = preprocess(decode_image(data), loaded)
    prepared = prepare_image(data, loaded)
    assert torch.equal(prepared.tensor, tensor) and prepared.geometry == geometry


# ---------------------------------------------------------------- a band at a time (issue 10)


class _AllocationSpy:
    """Records (mode, size) of every image Pillow makes from another one or anew (all go through
    ``Image._new``; a decoded file's own pixels do not)."""

    def __init__(self, monkeypatch):
        self.made: list[tuple[str, tuple[int, int]]] = []
        new = Image.Image._new

        def spy(image, im):
            self.made.append((im.mode, tuple(im.size)))
            return new(image, im)

        monkeypatch.setattr(Image.Image, "_new", spy)


@pytest.mark.parametrize("name", list(BAND_UPLOADS))
@pytest.mark.parametrize(("width", "height"), [(480, 360), (150, 1100)])  # 150x1100: Pillow 13 resizes it
def test_prepare_image_converts_other_modes_a_band_at_a_time(tiny_model, monkeypatch, name, width, height):
    """An upload needing conversion (alpha, palette, 16-bit, float, 1-bit, CMYK), turned upright or not,
    is converted and turned a band of rows at a time, never as a whole: no image of more than one
    channel larger than a band or the model input is made (only one full-size ``L`` plane per channel),
    and the model
    input is ``preprocess(decode_image(...))``'s bit for bit, on pixel noise, whatever order Pillow
    runs its two resampling passes in (vertically first for 150x1100)."""
    loaded = with_transform(tiny_model, (224, 224), "shortest", "bicubic")
    data = BAND_UPLOADS[name](width, height)
    want, geometry = preprocess(decode_image(data), loaded)
    band = 1 << 13
    monkeypatch.setattr(decode, "BAND_PIXELS", band)
    converted = spy_conversions(monkeypatch)
    made = _AllocationSpy(monkeypatch).made
    prepared = prepare_image(data, loaded, draft_oversampling=0)  # a JPEG decoded whole, as decode_image
    assert prepared.geometry == geometry and (geometry.width, geometry.height) == (width, height)
    assert torch.equal(prepared.tensor, want)
    assert len(converted) > 2 and all(w * h <= band for w, h in converted), converted
    large = [(mode, size) for mode, size in made if size[0] * size[1] > max(band, 224 * 224)]
    assert all(mode == "L" and size == (width, height) for mode, size in large), large
    assert len(large) <= 3


def test_the_one_band_shortcut_and_the_bands_give_the_same_model_input(tiny_model, monkeypatch):
    """An image of at most BAND_PIXELS is converted whole; the same image in many bands gives the same
    tensor."""
    loaded = with_transform(tiny_model, (32, 32), "shortest", "bicubic")
    data = BAND_UPLOADS["RGBA PNG, EXIF orientation 6"](300, 200)
    whole = prepare_image(data, loaded).tensor
    monkeypatch.setattr(decode, "BAND_PIXELS", 1000)
    assert torch.equal(prepare_image(data, loaded).tensor, whole)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_rotated_tiff_is_turned_once(tiny_model, orientation):
    """Pillow turns a TIFF upright itself (and reports its upright size before loading): its EXIF
    orientation must not be applied a second time, by image_size, prepare_image or decode_scaled."""
    stored = Image.fromarray(noise(64, 40)[0])
    data = with_exif(stored, orientation, "TIFF")
    upright = decode_image(data)
    assert upright.size == image_size(data) == ((64, 40) if orientation == 3 else (40, 64))
    want, geometry = preprocess(upright, tiny_model)
    prepared = prepare_image(data, tiny_model)
    assert prepared.geometry == geometry and torch.equal(prepared.tensor, want)
    scaled, size = decode_scaled(data, 1000)
    assert size == upright.size and np.array_equal(np.asarray(scaled), np.asarray(upright))
