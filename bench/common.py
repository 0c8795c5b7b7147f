"""What the bench scripts share beyond the test harness (the ``testing`` package, whose ``Process``,
``RedisServer`` and ``free_port`` they start processes with): the service command, client images,
percentiles and line-buffered output. Scripts import it as ``common`` (their own directory is on the
path).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["IMAGE_SIZES", "ROOT", "images", "line_buffered_stdout", "percentile", "service_command"]

IMAGE_SIZES = [(320, 240), (256, 256), (400, 300), (224, 320), (640, 480), (180, 180)]


def images() -> list[bytes]:
    """Distinct JPEGs: a colour gradient plus seeded noise, each of its own size."""
    out = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        rng = random.Random(i)
        noise = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
        base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        tint = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        img = Image.blend(Image.blend(base, tint, 0.5), noise, 0.3)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def service_command() -> list[str]:
    """``exclip-service`` when installed, else the same entry point through ``python -m``."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("exclip-service", path=search)
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def line_buffered_stdout() -> None:
    """Table rows appear as they are measured, also through a pipe (``| tee``). Only a text stream
    over a file can be reconfigured; anything else put in its place (a capture) stays as it is."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
