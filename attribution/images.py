"""Model inputs from images: the model's own transform, cropped before resizing, with its geometry.

``preprocess`` runs the model's open_clip transform on a decoded image and places it in the original
(``attribution.geometry``), so heatmaps map back onto the original image and original-pixel boxes map
onto patches. ``prepare_image`` does ``attribution.decode.decode_image`` + ``preprocess`` without a
full-size RGB copy of the upload: a large JPEG is decoded at a reduced scale, and other modes than RGB
and greyscale are converted (and turned upright) a band of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torchvision.transforms import Compose

from attribution.decode import (
    MAX_ASPECT_RATIO,
    UPRIGHT,
    convert_and_resize_in_bands,
    decoding,
    draft,
    exif_orientation,
    load_first_frame,
    open_image,
    refuse_elongated,
    upright_size,
)
from attribution.geometry import PIXEL_STEPS, ImageGeometry, ResizeCrop, place_patches, resize_crop_plan

if TYPE_CHECKING:
    from attribution.models import LoadedModel

# A JPEG is decoded at a reduced scale only while that keeps this many times the pixels the transform
# resizes to (see prepare_image).
DRAFT_OVERSAMPLING = 4.0


def _check_aspect_ratio(width: int, height: int, plan: ResizeCrop, max_aspect_ratio: float) -> None:
    if max(width, height) > max_aspect_ratio * min(width, height) or min(plan.resized) < 1:
        (w, h), (sx, sy) = plan.out, plan.scale
        seen = f"{min(w * sx, width):.4g}x{min(h * sy, height):.4g}"
        why = f" (the model's input is a fixed {w}x{h}, which covers {seen} original pixels of this one)"
        refuse_elongated(width, height, max_aspect_ratio, why)


def _crop_then_resize(
    image: Image.Image, plan: ResizeCrop, source_scale: float = 1.0, orientation: int = 1
) -> Image.Image:
    """The transform's resize + crop/pad, resampling only the pixels the crop keeps (RGB or ``L``).

    Pillow's ``resize(box=...)`` samples the source at the same points, with the same filter support
    (which may reach outside the box), as resizing the whole image and cropping, so the result equals
    the transform's up to rounding; but nothing larger than the model input is allocated for an RGB
    or ``L`` image, which is resampled as it is (after turning it upright, for a stored ``image`` with
    an EXIF ``orientation``). ``source_scale``: pixels of ``image`` per original pixel (below 1 for a
    JPEG decoded at a reduced scale). Any other mode is turned and converted a band at a time
    (``convert_and_resize_in_bands``, ``exact``: the same result as converting and turning it whole
    first, with one full-size ``L`` plane at a time instead of a full-size RGB copy).
    """
    (rw, rh), (ox, oy), (ow, oh) = plan.resized, plan.offset, plan.out
    ix0, iy0 = max(ox, 0), max(oy, 0)  # resized pixels inside both the image and the crop window
    ix1, iy1 = min(ox + ow, rw), min(oy + oh, rh)
    size = (ix1 - ix0, iy1 - iy0)
    skip = (rw, rh) == (plan.width, plan.height) and source_scale == 1  # torchvision skips such a resize
    if skip:
        box: tuple[float, float, float, float] = (ix0, iy0, ix1, iy1)
    else:
        sx, sy = (v * source_scale for v in plan.scale)
        box = (ix0 * sx, iy0 * sy, ix1 * sx, iy1 * sy)
    method = UPRIGHT.get(orientation)
    if image.mode not in ("RGB", "L"):
        region = convert_and_resize_in_bands(image, size, plan.resample, box, orientation=orientation)
    elif skip:
        region = (image if method is None else image.transpose(method)).crop((ix0, iy0, ix1, iy1))
    else:
        region = (image if method is None else image.transpose(method)).resize(size, plan.resample, box=box)
    if region.size == (ow, oh):
        return region
    fill = plan.fill if isinstance(plan.fill, (tuple, list)) else (int(plan.fill),) * 3
    canvas = Image.new("RGB", (ow, oh), tuple(fill))
    canvas.paste(region, (ix0 - ox, iy0 - oy))
    return canvas


def _to_tensor(pixels: Any, transform: Any) -> torch.Tensor:
    """The transform's pixel steps (mode, to-tensor, normalise) on the cropped and resized image."""
    for step in transform.transforms if isinstance(transform, Compose) else [transform]:
        if isinstance(step, PIXEL_STEPS):
            pixels = step(pixels)
    tensor: torch.Tensor = pixels.to(dtype=torch.float32, device="cpu")
    return tensor


@dataclass(frozen=True)
class ModelInput:
    """An image as the model takes it: ``tensor`` (3, H, W) float32 on CPU, and where it lies."""

    tensor: torch.Tensor
    geometry: ImageGeometry


def preprocess(
    image: Image.Image, loaded: LoadedModel, *, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> tuple[torch.Tensor, ImageGeometry]:
    """The model's own transform of ``image`` (float32, (3, H, W), CPU) and where it lies in ``image``.

    Crops to the region the model sees before resizing (see ``_crop_then_resize``), so the work and the
    memory are those of the model input whatever the image's shape (``decode_image``'s mode rules
    apply to a non-RGB ``image``, without a full-size RGB copy). Raises ``InvalidImage`` for an image
    whose long side exceeds ``max_aspect_ratio`` times its short side.
    """
    plan = resize_crop_plan(image.width, image.height, loaded.transform)
    _check_aspect_ratio(image.width, image.height, plan, max_aspect_ratio)
    geometry = place_patches(plan, loaded.patch_size, loaded.grid)
    pixels = _crop_then_resize(image, plan)  # other modes than RGB and L: converted a band at a time
    return _to_tensor(pixels.convert("RGB"), loaded.transform), geometry


def prepare_image(
    data: bytes,
    loaded: LoadedModel,
    *,
    max_pixels: int = 64_000_000,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    draft_oversampling: float = DRAFT_OVERSAMPLING,
) -> ModelInput:
    """``decode_image`` + ``preprocess`` in one step that keeps memory near the model input's size.

    Refuses a too elongated image from its header, before decoding. A JPEG much larger than the model
    needs is decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT) that keeps at least
    ``draft_oversampling`` times the resolution the transform resizes to (0 disables this); the
    result then differs from full decoding by less than one 8-bit level on most pixels. Other modes
    than RGB and greyscale (alpha, palette, 16-bit, CMYK, ...) are converted (and turned upright) a
    band of rows at a time while the crop region is resampled, with the same result as
    ``decode_image`` + ``preprocess`` but no full-size RGB copy (one full-size one-channel plane at a
    time).
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):  # before decoding (rotation-proof)
        refuse_elongated(width, height, max_aspect_ratio)
    orientation = exif_orientation(img)
    upright = upright_size((width, height), orientation)
    plan = resize_crop_plan(*upright, loaded.transform)
    _check_aspect_ratio(*upright, plan, max_aspect_ratio)
    geometry = place_patches(plan, loaded.patch_size, loaded.grid)

    with decoding(img):
        source_scale = 1.0
        if draft_oversampling > 0:
            want_w, want_h = (int(draft_oversampling * v) + 1 for v in plan.resized)
            source_scale = draft(img, (want_w, want_h), orientation)
        load_first_frame(img)
        pixels = _crop_then_resize(img, plan, source_scale, orientation)
    return ModelInput(_to_tensor(pixels.convert("RGB"), loaded.transform), geometry)
