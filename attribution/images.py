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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from attribution.errors import InvalidImage, InvalidSelection, UnsupportedModel

if TYPE_CHECKING:
    from attribution.models import LoadedModel

# Raster formats a caller may send. Others (EPS runs Ghostscript, PSD, FITS, ...) are refused outright.
Image.init()  # register all plugins, so the list below can be checked against what this Pillow can read
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF") if f in Image.OPEN)
# Transparent pixels are composited on white, as an image viewer on a white page shows them.
ALPHA_BACKGROUND = (255, 255, 255)

_PIXEL_STEPS = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)  # no geometric effect


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of ``img``; the rules for each source mode are the module's documented behaviour."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: integer samples taken as 16-bit (0..65535)
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":  # floats have no fixed range: stretch min..max to 0..255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(arr).astype(np.uint8), "L").convert("RGB")
    try:  # 1, L, CMYK, YCbCr, ...: Pillow's own conversion
        return img.convert("RGB")
    except ValueError as e:
        raise InvalidImage(f"image mode {mode!r} cannot be converted to RGB; send RGB or greyscale") from e


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode untrusted image bytes to an upright RGB image, or raise ``InvalidImage`` saying why.

    The pixel count is checked from the header (``Image.open`` reads nothing else) before decoding, so a
    decompression bomb costs nothing. Animated images give their first frame.
    """
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
    try:
        img.seek(0)  # first frame of animated GIF/WebP/TIFF
        img.load()
        upright = ImageOps.exif_transpose(img)
        return _to_rgb(upright)
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"{img.format} image data is broken or truncated: {e}") from e


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
        """The ``image`` object of a result: width, height, crop_box, patch_size (w, h)."""
        return {
            "width": self.width,
            "height": self.height,
            "crop_box": [float(v) for v in self.crop_box],
            "patch_size": [float(v) for v in self.patch_size],
        }


def _crop_offset(size: int, crop: int) -> int:
    # torchvision center_crop / open_clip center_crop_or_pad: pad (left part floor) if smaller, else crop.
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def transform_geometry(
    width: int,
    height: int,
    transform: Any,
    patch_size: tuple[int, int],
    grid: tuple[int, int],
) -> ImageGeometry:
    """Follow ``transform``'s resize and crop steps to place its output (and patches) in the original.

    ``patch_size`` is (h, w) and ``grid`` (rows, cols) in model-input pixels, as in ``LoadedModel``.
    Model-input coordinate u maps to original x = crop_box[0] + u * scale_x (pixel-edge convention).
    """
    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    cur_w, cur_h = width, height
    scale_x = scale_y = 1.0
    off_x = off_y = 0.0
    for step in steps:
        if isinstance(step, Resize):
            # torchvision's own size arithmetic for Resize (shortest side, or exact (h, w)).
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            new_h, new_w = TF._compute_resized_output_size((cur_h, cur_w), size, step.max_size)
        elif isinstance(step, ResizeKeepRatio):
            new_h, new_w = step.get_params(SimpleNamespace(size=(cur_w, cur_h)), step.size, step.longest)
        elif isinstance(step, (CenterCrop, CenterCropOrPad)):
            crop_h, crop_w = step.size
            off_x += _crop_offset(cur_w, crop_w) * scale_x
            off_y += _crop_offset(cur_h, crop_h) * scale_y
            cur_w, cur_h = crop_w, crop_h
            continue
        elif isinstance(step, _PIXEL_STEPS):
            continue
        else:
            raise UnsupportedModel(f"image transform step {step!r} is not understood; cannot place patches")
        scale_x *= cur_w / new_w
        scale_y *= cur_h / new_h
        cur_w, cur_h = new_w, new_h

    (patch_h, patch_w), (rows, cols) = patch_size, grid
    if (cur_w, cur_h) != (cols * patch_w, rows * patch_h):
        raise UnsupportedModel(
            f"the image transform yields {cur_w}x{cur_h} pixels but the model expects "
            f"{cols * patch_w}x{rows * patch_h}"
        )
    return ImageGeometry(
        width=width,
        height=height,
        crop_box=(off_x, off_y, off_x + cur_w * scale_x, off_y + cur_h * scale_y),
        grid=(rows, cols),
        patch_size=(patch_w * scale_x, patch_h * scale_y),
    )


def preprocess(image: Image.Image, loaded: LoadedModel) -> tuple[torch.Tensor, ImageGeometry]:
    """The model's own transform of ``image`` (float32, (3, H, W), CPU) and where it lies in ``image``."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    geometry = transform_geometry(image.width, image.height, loaded.transform, loaded.patch_size, loaded.grid)
    tensor = loaded.transform(image).to(dtype=torch.float32, device="cpu")
    return tensor, geometry
