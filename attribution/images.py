"""Image decoding and preprocessing that remembers where every model patch lies in the original image.

``decode_image`` turns untrusted bytes into an upright RGB ``PIL.Image`` (EXIF orientation applied,
first frame of animations, alpha composited on white, 16-bit greyscale scaled down), checking the pixel
count from the header before any pixel data is decoded. ``preprocess`` runs the model's own open_clip
transform and derives an ``ImageGeometry`` from that transform's parameters (resize, then centre crop
or pad), so heatmaps map back onto the original image and original-pixel boxes map onto patches.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.functional import pil_modes_mapping

from attribution.errors import InvalidImage, InvalidSelection, UnsupportedModel

if TYPE_CHECKING:
    from attribution.models import LoadedModel

# Raster formats a caller may send. Others (EPS runs Ghostscript, PSD, FITS, ...) are refused outright.
Image.init()  # register all plugins, so the list below can be checked against what this Pillow can read
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF") if f in Image.OPEN)
# Transparent pixels are composited on white, as an image viewer on a white page shows them.
ALPHA_BACKGROUND = (255, 255, 255)

# Images whose long side exceeds this many times their short side are refused: the model sees a fixed
# (square, for most models) input, so of such an image it sees a sliver (centre crop) or a few pixel
# rows (padding), and the heatmap would say little about the image.
MAX_ASPECT_RATIO = 16.0

# A JPEG is decoded at a reduced scale only while that keeps this many times the pixels the transform
# resizes to (see prepare_image).
DRAFT_OVERSAMPLING = 4.0

_PIXEL_STEPS = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)  # no geometric effect


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of ``img``; the rules for each source mode are the module's documented behaviour."""
    out = _to_rgb_or_grey(img)
    return out if out.mode == "RGB" else out.convert("RGB")


def _to_rgb_or_grey(img: Image.Image) -> Image.Image:
    """``_to_rgb``, except that greyscale sources stay one-channel ``L`` (a third of the memory; resizing
    commutes with copying L into three channels, so it can come after)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba)  # Pillow pastes RGBA onto RGB without a copy, using the alpha band
        return out
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: integer samples taken as 16-bit (0..65535)
        # round(v / 257) in integers: v / 257 is never exactly half-way, as 257 is odd.
        return _rows_to_grey(img, lambda a: (2 * np.clip(a.astype(np.int64), 0, 65535) + 257) // 514)
    if mode == "F":  # floats have no fixed range: stretch min..max to 0..255
        lo, hi = np.inf, -np.inf
        for rows in _row_chunks(img):
            arr = np.asarray(rows, dtype=np.float64)
            if not np.isnan(arr).all():
                lo, hi = min(lo, float(np.nanmin(arr))), max(hi, float(np.nanmax(arr)))
        if not hi > lo:
            return Image.new("L", img.size, 0)
        return _rows_to_grey(img, lambda a: np.nan_to_num((a.astype(np.float64) - lo) / (hi - lo) * 255.0))
    try:  # 1, CMYK, YCbCr, ...: Pillow's own conversion
        return img.convert("L" if mode == "1" else "RGB")
    except ValueError as e:
        raise InvalidImage(f"image mode {mode!r} cannot be converted to RGB; send RGB or greyscale") from e


_CHUNK_PIXELS = 1 << 20  # samples converted at a time, so a 40 MP 16-bit or float image is not copied whole


def _row_chunks(img: Image.Image) -> Iterator[Image.Image]:
    step = max(1, _CHUNK_PIXELS // max(img.width, 1))
    for top in range(0, img.height, step):
        yield img.crop((0, top, img.width, min(top + step, img.height)))


def _rows_to_grey(img: Image.Image, to_byte: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """``L`` image of ``to_byte(samples)`` (clipped to 0..255), computed a band of rows at a time."""
    grey = Image.new("L", img.size)
    top = 0
    for rows in _row_chunks(img):
        band = np.clip(to_byte(np.asarray(rows)), 0, 255).astype(np.uint8)
        grey.paste(Image.fromarray(band, "L"), (0, top))
        top += rows.height
    return grey


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The lazily opened image (header only), after the checks that need no pixel data."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage(f"image is empty (0 bytes); send a file in one of: {', '.join(FORMATS)}")
    try:
        with warnings.catch_warnings():  # our own max_pixels is the limit that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"image is far too large ({e}); the limit is {max_pixels} pixels") from e
    except UnidentifiedImageError as e:
        raise InvalidImage(_unidentified_reason(bytes(data[:16]), len(data))) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidImage(f"image header is broken: {e}") from e

    width, height = img.size
    if width * height > max_pixels:
        raise InvalidImage(
            f"image has {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError):
        return 1  # unreadable EXIF: take the pixels as stored, as viewers do


def _decode(img: Image.Image, *, keep_grey: bool = False) -> Image.Image:
    """Decode an opened image to upright RGB (or ``L`` for greyscale if ``keep_grey``); ``InvalidImage``
    for broken data."""
    try:
        img.seek(0)  # first frame of animated GIF/WebP/TIFF
        img.load()
        if _orientation(img) != 1:  # exif_transpose copies even an upright image: only call it to turn
            img = ImageOps.exif_transpose(img)
        return _to_rgb_or_grey(img) if keep_grey else _to_rgb(img)
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{img.format} image data is broken or truncated: {e}") from e


def image_size(
    data: bytes, *, max_pixels: int = 64_000_000, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> tuple[int, int]:
    """The upright (width, height) of untrusted image bytes from their header, without decoding pixels.

    Runs the checks ``prepare_image`` runs before decoding (format, pixel count, aspect ratio), so a
    service can refuse such uploads, and check boxes against ``transform_geometry``, cheaply. Broken
    pixel data is only found when decoding. EXIF orientation is read where the format keeps it in the
    header (JPEG, WebP, TIFF); a PNG's is found only in chunks before the image data.
    """
    img = _open(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):
        _refuse_elongated(width, height, max_aspect_ratio)
    exif = img.info.get("exif") if img.format == "PNG" else None
    if img.format == "PNG":  # getexif() would decode a PNG to look for a late eXIf chunk
        orientation = Image.Exif()
        if exif:
            orientation.load(exif)
        turned = orientation.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    else:
        turned = _orientation(img) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image, or raise ``InvalidImage`` saying why.

    The pixel count is checked from the header (``Image.open`` reads nothing else) before decoding, so a
    decompression bomb costs nothing. Animated images give their first frame.
    """
    return _decode(_open(data, max_pixels))


def _unidentified_reason(prefix: bytes, size: int) -> str:
    """Why Pillow could not open the data: a broken header of a known format, a refused format, or junk."""
    supported = ", ".join(FORMATS)
    for fmt, (_factory, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            if fmt in FORMATS:  # the signature matched but the plugin rejected the header
                return (
                    f"data starts like a {fmt} image but its header is broken or declares an empty "
                    "(zero width or height) image"
                )
            return f"{fmt} images are not accepted; supported: {supported}"
    return f"data ({size} bytes) is not an image in a supported format; supported: {supported}"


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
        """width, height, crop_box, patch_size (w, h) and grid [rows, cols]; a result's ``image``
        object is this without ``grid`` (which a result gives as ``grid: {rows, cols}``)."""
        return {
            "width": self.width,
            "height": self.height,
            "crop_box": [float(v) for v in self.crop_box],
            "patch_size": [float(v) for v in self.patch_size],
            "grid": list(self.grid),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageGeometry:
        """The inverse of ``to_dict``."""
        x0, y0, x1, y1 = (float(v) for v in d["crop_box"])
        pw, ph = (float(v) for v in d["patch_size"])
        rows, cols = (int(v) for v in d["grid"])
        return cls(int(d["width"]), int(d["height"]), (x0, y0, x1, y1), (rows, cols), (pw, ph))


def _crop_offset(size: int, crop: int) -> int:
    # torchvision center_crop / open_clip center_crop_or_pad: pad (left part floor) if smaller, else crop.
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class _ResizeCrop:
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


def _plan(width: int, height: int, transform: Any) -> _ResizeCrop:
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
        elif isinstance(step, _PIXEL_STEPS):
            continue
        else:
            raise UnsupportedModel(
                f"image transform step {step!r} is not understood (expected one resize, then one centre "
                "crop or pad); cannot place patches"
            )
    out = crop or resized
    offset = (_crop_offset(resized[0], out[0]), _crop_offset(resized[1], out[1]))
    return _ResizeCrop(width, height, resized, offset, out, resample, fill)


def _refuse_elongated(width: int, height: int, max_aspect_ratio: float, why: str = "") -> None:
    long, short = max(width, height), min(width, height)
    raise InvalidImage(
        f"image is {width}x{height} pixels, an aspect ratio of {long / short:.4g}:1; images whose long "
        f"side exceeds {max_aspect_ratio:g} times their short side are refused{why}; crop the image to "
        "the part to explain"
    )


def _check_aspect_ratio(width: int, height: int, plan: _ResizeCrop, max_aspect_ratio: float) -> None:
    if max(width, height) > max_aspect_ratio * min(width, height) or min(plan.resized) < 1:
        (w, h), (sx, sy) = plan.out, plan.scale
        seen = f"{min(w * sx, width):.4g}x{min(h * sy, height):.4g}"
        why = f" (the model's input is a fixed {w}x{h}, which covers {seen} original pixels of this one)"
        _refuse_elongated(width, height, max_aspect_ratio, why)


def _geometry(plan: _ResizeCrop, patch_size: tuple[int, int], grid: tuple[int, int]) -> ImageGeometry:
    (patch_h, patch_w), (rows, cols) = patch_size, grid
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
    pixel is decoded. ``patch_size`` is (h, w) and ``grid`` (rows, cols) in model-input pixels, as in
    ``LoadedModel``. Model-input coordinate u maps to original x = crop_box[0] + u * scale_x (pixel-edge
    convention).
    """
    return _geometry(_plan(width, height, transform), patch_size, grid)


def _crop_then_resize(image: Image.Image, plan: _ResizeCrop, source_scale: float = 1.0) -> Image.Image:
    """The transform's resize + crop/pad, resampling only the pixels the crop keeps.

    Pillow's ``resize(box=...)`` samples the source at the same points, with the same filter support
    (which may reach outside the box), as resizing the whole image and cropping, so the result equals
    the transform's up to rounding; but nothing larger than the model input is ever allocated.
    ``source_scale``: pixels of ``image`` per original pixel (below 1 for a JPEG decoded at a reduced
    scale).
    """
    (rw, rh), (ox, oy), (ow, oh) = plan.resized, plan.offset, plan.out
    ix0, iy0 = max(ox, 0), max(oy, 0)  # resized pixels inside both the image and the crop window
    ix1, iy1 = min(ox + ow, rw), min(oy + oh, rh)
    if (rw, rh) == (plan.width, plan.height) and source_scale == 1:  # torchvision skips such a resize
        region = image.crop((ix0, iy0, ix1, iy1))
    else:
        sx, sy = (v * source_scale for v in plan.scale)
        box = (ix0 * sx, iy0 * sy, ix1 * sx, iy1 * sy)
        region = image.resize((ix1 - ix0, iy1 - iy0), plan.resample, box=box)
    if region.size == (ow, oh):
        return region
    fill = plan.fill if isinstance(plan.fill, (tuple, list)) else (int(plan.fill),) * 3
    canvas = Image.new("RGB", (ow, oh), tuple(fill))
    canvas.paste(region, (ix0 - ox, iy0 - oy))
    return canvas


def _to_tensor(pixels: Any, transform: Any) -> torch.Tensor:
    """The transform's pixel steps (mode, to-tensor, normalise) on the cropped and resized image."""
    for step in transform.transforms if isinstance(transform, Compose) else [transform]:
        if isinstance(step, _PIXEL_STEPS):
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
    memory are those of the model input whatever the image's shape. Raises ``InvalidImage`` for an
    image whose long side exceeds ``max_aspect_ratio`` times its short side.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    plan = _plan(image.width, image.height, loaded.transform)
    _check_aspect_ratio(image.width, image.height, plan, max_aspect_ratio)
    geometry = _geometry(plan, loaded.patch_size, loaded.grid)
    return _to_tensor(_crop_then_resize(image, plan), loaded.transform), geometry


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
    result then differs from full decoding by less than one 8-bit level on most pixels.
    """
    img = _open(data, max_pixels)
    width, height = img.size
    if max(width, height) > max_aspect_ratio * min(width, height):  # before decoding (rotation-proof)
        _refuse_elongated(width, height, max_aspect_ratio)
    turned = _orientation(img) in (5, 6, 7, 8)
    upright = (height, width) if turned else (width, height)
    plan = _plan(*upright, loaded.transform)
    _check_aspect_ratio(*upright, plan, max_aspect_ratio)
    geometry = _geometry(plan, loaded.patch_size, loaded.grid)

    source_scale = 1.0
    if img.format == "JPEG" and draft_oversampling > 0:
        want_w, want_h = (int(draft_oversampling * v) + 1 for v in plan.resized)
        drafted = img.draft("RGB", (want_h, want_w) if turned else (want_w, want_h))
        if drafted is not None:
            source_scale = drafted[1][2] / width  # the draft's exact factor (1/2, 1/4 or 1/8)
    pixels = _crop_then_resize(_decode(img, keep_grey=True), plan, source_scale)
    return ModelInput(_to_tensor(pixels.convert("RGB"), loaded.transform), geometry)
