"""Where the model's input, and each of its patches, lies in the original image.

``transform_geometry`` follows the model's own open_clip eval transform (resize, then centre crop or
pad) from the image size alone, so boxes can be checked before any pixel is decoded; ``ImageGeometry``
is the result, in original pixels (after EXIF rotation). Patch sizes are (width, height) wherever they
appear (here, in ``LoadedModel`` and in results), as image sizes in Pillow; ``grid`` is (rows, cols).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.functional import pil_modes_mapping

from attribution.errors import InvalidSelection, UnsupportedModel

PIXEL_STEPS = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)  # no geometric effect


@dataclass(frozen=True)
class ImageGeometry:
    """Where the model's input lies in the original image (after EXIF rotation), in original pixels.

    ``crop_box`` (x0, y0, x1, y1) is the region the model sees (it can reach outside the image where the
    transform pads); patch (row, col) covers ``patch_box(row, col)``; ``patch_size`` is (w, h).
    """

    width: int
    height: int
    crop_box: tuple[float, float, float, float]
    grid: tuple[int, int]
    patch_size: tuple[float, float]

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of patch (row, col) in original pixels."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise InvalidSelection(f"patch ({row}, {col}) is outside the {rows}x{cols} grid")
        pw, ph = self.patch_size
        x0, y0 = self.crop_box[0] + col * pw, self.crop_box[1] + row * ph
        return (x0, y0, x0 + pw, y0 + ph)

    def to_dict(self) -> dict[str, Any]:
        """width, height, crop_box, patch_size (w, h) and grid ``{rows, cols}``: a result's ``image``
        object is this without ``grid``, which a result gives under its own key."""
        rows, cols = self.grid
        return {
            "width": self.width,
            "height": self.height,
            "crop_box": [float(v) for v in self.crop_box],
            "patch_size": [float(v) for v in self.patch_size],
            "grid": {"rows": rows, "cols": cols},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageGeometry:
        """The inverse of ``to_dict``."""
        x0, y0, x1, y1 = (float(v) for v in d["crop_box"])
        pw, ph = (float(v) for v in d["patch_size"])
        rows, cols = int(d["grid"]["rows"]), int(d["grid"]["cols"])
        return cls(int(d["width"]), int(d["height"]), (x0, y0, x1, y1), (rows, cols), (pw, ph))


def _crop_offset(size: int, crop: int) -> int:
    # torchvision center_crop / open_clip center_crop_or_pad: pad (left part floor) if smaller, else crop.
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class ResizeCrop:
    """An eval transform's geometry: resize the whole image to ``resized`` (w, h), then take the
    ``out`` (w, h) window at ``offset`` (x, y) of the resized image (negative: padding with ``fill``)."""

    width: int
    height: int
    resized: tuple[int, int]
    offset: tuple[int, int]
    out: tuple[int, int]
    resample: Image.Resampling
    fill: Any

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per resized pixel, (x, y)."""
        return self.width / self.resized[0], self.height / self.resized[1]


def _resample(interpolation: Any) -> Image.Resampling:
    if isinstance(interpolation, InterpolationMode):
        return Image.Resampling(pil_modes_mapping[interpolation])
    return Image.Resampling(interpolation)


def resize_crop_plan(width: int, height: int, transform: Any) -> ResizeCrop:
    """Read ``transform``'s resize and crop steps (open_clip's eval transforms: resize, then crop/pad)."""
    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    resized, resample = (width, height), Image.Resampling.BICUBIC
    resizes = 0
    crop: tuple[int, int] | None = None
    fill: Any = 0
    for step in steps:
        if isinstance(step, (Resize, ResizeKeepRatio)) and crop is None and resizes == 0:
            resizes += 1
            if isinstance(step, Resize):
                # torchvision's own size arithmetic for Resize (shortest side, or exact (h, w)).
                size = [step.size] if isinstance(step.size, int) else list(step.size)
                new_h, new_w = TF._compute_resized_output_size((height, width), size, step.max_size)
            else:
                new_h, new_w = step.get_params(SimpleNamespace(size=(width, height)), step.size, step.longest)
            resized, resample = (new_w, new_h), _resample(step.interpolation)
        elif isinstance(step, (CenterCrop, CenterCropOrPad)) and crop is None:
            crop_h, crop_w = step.size
            crop = (crop_w, crop_h)
            fill = getattr(step, "fill", 0)
        elif isinstance(step, PIXEL_STEPS):
            continue
        else:
            raise UnsupportedModel(
                f"image transform step {step!r} is not understood (expected one resize, then one centre "
                "crop or pad); cannot place patches"
            )
    out = crop or resized
    offset = (_crop_offset(resized[0], out[0]), _crop_offset(resized[1], out[1]))
    return ResizeCrop(width, height, resized, offset, out, resample, fill)


def place_patches(plan: ResizeCrop, patch_size: tuple[int, int], grid: tuple[int, int]) -> ImageGeometry:
    """The geometry of ``plan``'s output cut into ``grid`` patches of ``patch_size`` model-input pixels."""
    (patch_w, patch_h), (rows, cols) = patch_size, grid
    out_w, out_h = plan.out
    if (out_w, out_h) != (cols * patch_w, rows * patch_h):
        raise UnsupportedModel(
            f"the image transform yields {out_w}x{out_h} pixels but the model expects "
            f"{cols * patch_w}x{rows * patch_h}"
        )
    (sx, sy), (ox, oy) = plan.scale, plan.offset
    return ImageGeometry(
        width=plan.width,
        height=plan.height,
        crop_box=(ox * sx, oy * sy, (ox + out_w) * sx, (oy + out_h) * sy),
        grid=(rows, cols),
        patch_size=(patch_w * sx, patch_h * sy),
    )


def transform_geometry(
    width: int,
    height: int,
    transform: Any,
    patch_size: tuple[int, int],
    grid: tuple[int, int],
) -> ImageGeometry:
    """Follow ``transform``'s resize and crop steps to place its output (and patches) in the original.

    Needs only the image size, so a service can check boxes (``selections.check_box``) before any
    pixel is decoded. ``patch_size`` is (w, h) in model-input pixels and ``grid`` (rows, cols), as in
    ``LoadedModel``. Model-input coordinate u maps to original x = crop_box[0] + u * scale_x (pixel-edge
    convention).
    """
    return place_patches(resize_crop_plan(width, height, transform), patch_size, grid)
