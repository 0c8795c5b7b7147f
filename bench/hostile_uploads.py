"""Peak memory of the API and the worker under hostile uploads and captions.

Starts its own processes on loopback with the shared harness (the ``testing`` package): a private
``redis-server``, the API (``serve`` with REDIS_URL) and one worker with the tiny model. For each case
it resets the kernel's peak-RSS counter of both processes (``/proc/PID/clear_refs``), runs the case,
and reads the peak (``VmHWM``) back: the table gives, per case, the time, the HTTP statuses and the
peak RSS above the process's RSS before the case, for the API and the worker.

Cases: a 6000x6000 grey PNG (explain, then one or four concurrent ``heatmap.png?legend=true``, with
the default two render slots and with four), a 6324x6324 (40 MP) RGBA PNG and a 6324x6324 RGB JPEG
(explain, then one legend PNG), a 1x250000 PNG, a 24000x1 PNG, the caption
``'&' + 'amp;'*4000 + ' dog'``, and a caption with literal special-token text. Then the uploads whose
decoders hold more than the decoded frame (``attribution.decode.FORMAT_PIXEL_PERCENT``), each at 40 MP
(the general limit) and at the largest square its own limit accepts (explain, then one legend PNG):
WebP (lossy, lossless, lossy with alpha), AVIF (RGBA 4:4:4, the costliest AVIF Pillow writes), a
progressive CMYK JPEG, and an RGBA TIFF stored in one strip.

    python bench/hostile_uploads.py
    python bench/hostile_uploads.py --only RGBA --only JPEG          # the cases whose name has a word
    python bench/hostile_uploads.py --baseline-ref 6f4c82b           # also: renders, old vs new renderer
    python bench/hostile_uploads.py --baseline-ref HEAD --render-only

``--baseline-ref`` first renders the legend PNG of the three large uploads (grey PNG, RGBA PNG, JPEG),
each in a fresh process, with the renderer of that git revision and with the current one (decode +
render + PNG encode of the same bytes: the heatmap route's whole ``render_png``), side by side;
``--render-only`` stops there.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from testing import RedisServer, ServiceLauncher, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

MIB = 2**20


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, format="PNG")
    return out.getvalue()


def _picture(side: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``side`` x ``side`` RGB picture (gradients and waves) and an alpha plane (a checkerboard of opaque
    squares and a transparency ramp): compressible, so 40 MP fit in an upload."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    rgb = np.stack(
        [x * 255 / side, y * 255 / side, (np.sin(x / 50) * np.cos(y / 70) + 1) * 127], axis=-1
    ).astype(np.uint8)
    alpha = np.where((x // 400 + y // 400) % 2 == 0, 255, x * 255 / side).astype(np.uint8)
    return rgb, alpha


def rgba_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGBA PNG (6324: 40 MP in about 8 MB)."""
    rgb, alpha = _picture(side)
    out = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(out, format="PNG")
    return out.getvalue()


def noisy_jpeg(side: int) -> bytes:
    """A ``side`` x ``side`` RGB JPEG with grain, quality 85 (6324: 40 MP in about 11 MB)."""
    rgb, _ = _picture(side)
    grain = np.random.default_rng(0).integers(-12, 13, rgb.shape, dtype=np.int16)
    rgb = np.clip(rgb + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def webp(side: int, *, lossless: bool = False, alpha: bool = False) -> bytes:
    """A black ``side`` x ``side`` WebP (lossy at quality 1, or lossless; half-transparent with ``alpha``):
    a few KB, whatever the size."""
    out = io.BytesIO()
    image = Image.new("RGBA", (side, side), (0, 0, 0, 128)) if alpha else Image.new("RGB", (side, side))
    image.save(out, format="WEBP", lossless=lossless, quality=1, method=0)
    return out.getvalue()


def avif(side: int) -> bytes:
    """A half-transparent black ``side`` x ``side`` AVIF, 4:4:4 (the costliest to decode of what Pillow
    writes: 8-bit; a 12-bit one costs about a third more a pixel): about 2 KB."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 128)).save(
        out, format="AVIF", quality=0, speed=10, subsampling="4:4:4"
    )
    return out.getvalue()


def progressive_cmyk_jpeg(side: int) -> bytes:
    """A ``side`` x ``side`` progressive CMYK JPEG: libjpeg keeps all its DCT coefficients (8 bytes a
    pixel) whatever scale it decodes at."""
    rgb, _ = _picture(side)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert("CMYK").save(out, format="JPEG", quality=90, progressive=True)
    return out.getvalue()


def one_strip_tiff(side: int) -> bytes:
    """A half-transparent black ``side`` x ``side`` RGBA TIFF, deflated, in one strip: Pillow decodes the
    whole strip into a buffer of its own before copying it into the image."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 128)).save(
        out, format="TIFF", compression="tiff_adobe_deflate", strip_size=1 << 40
    )
    return out.getvalue()


def mime(image: bytes) -> str:
    return "image/jpeg" if image[:2] == b"\xff\xd8" else "image/png"


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """Peak RSS of a process over a block, above its RSS at the start (kernel counters, no sampling)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Peak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start = _status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.added_mib = (_status_kib(self.pid, "VmHWM") - self.start) / 1024


async def _explain(client: httpx.AsyncClient, image: bytes, caption: str) -> httpx.Response:
    files = {"image": ("upload", image, mime(image))}
    return await client.post("/explain", files=files, data={"caption": caption, "steps": "2", "wait": "60"})


async def _case(url: str, image: bytes, caption: str, heatmaps: int) -> tuple[list[int], str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        first = await _explain(client, image, caption)
        statuses, note = [first.status_code], ""
        if first.status_code == 200 and heatmaps:
            job = first.json()["id"]
            replies = await asyncio.gather(
                *(client.get(f"/jobs/{job}/heatmap.png", params={"legend": "true"}) for _ in range(heatmaps))
            )
            statuses += [r.status_code for r in replies]
            if replies[0].status_code == 200:
                width, height = Image.open(io.BytesIO(replies[0].content)).size
                note = f"PNG {width}x{height}"
        elif first.status_code != 200:
            note = first.json().get("detail", "")[:70]
    return statuses, note


# Formats with pixel limits of their own (defaults, EXCLIP_MAX_PIXELS=40000000), each at 40 MP and at the
# largest square under its limit: (that side, name, maker of an upload of a side, caption).
FORMATS_WITH_LIMITS: list[tuple[int, str, Callable[[int], bytes], str]] = [
    (3162, "WebP lossy", webp, "black"),
    (3162, "WebP lossless", partial(webp, lossless=True), "black"),
    (3162, "WebP RGBA", partial(webp, alpha=True), "black"),
    (3162, "AVIF RGBA 4:4:4", avif, "black"),
    (4472, "progressive CMYK JPEG", progressive_cmyk_jpeg, "waves"),
    (4000, "one-strip RGBA TIFF", one_strip_tiff, "black"),
]

# name, image, caption, concurrent legend PNGs of the job, extra env of the API
CASES: list[tuple[str, Callable[[], bytes], str, int, dict[str, str]]] = [
    ("6000x6000 grey PNG + 1 legend PNG", lambda: png(6000, 6000), "a grey square", 1, {}),
    ("6000x6000 grey PNG + 4 concurrent legend PNGs", lambda: png(6000, 6000), "a grey square", 4, {}),
    (
        "same, EXCLIP_MAX_RENDERS=4 (all four at once)",
        lambda: png(6000, 6000),
        "a grey square",
        4,
        {"EXCLIP_MAX_RENDERS": "4"},
    ),
    ("6324x6324 RGBA PNG (40 MP) + 1 legend PNG", lambda: rgba_png(6324), "a checkerboard", 1, {}),
    ("6324x6324 RGB JPEG (40 MP) + 1 legend PNG", lambda: noisy_jpeg(6324), "a grainy gradient", 1, {}),
    ("1x250000 PNG", lambda: png(1, 250_000), "a line", 0, {}),
    ("24000x1 PNG", lambda: png(24_000, 1), "a line", 0, {}),
    ("caption '&' + 'amp;'*4000 + ' dog'", lambda: png(64, 48), "&" + "amp;" * 4000 + " dog", 0, {}),
    ("caption with literal <end_of_text>", lambda: png(64, 48), "a photo <end_of_text> of a red ball", 0, {}),
    *(
        (
            f"{side}x{side} {name} ({round(side * side / 1e6)} MP) + 1 legend PNG",
            partial(make, side),
            caption,
            1,
            {},
        )
        for side_at_limit, name, make, caption in FORMATS_WITH_LIMITS
        for side in (6324, side_at_limit)
    ),
]


# One heatmap route render (decode + overlay + legend + PNG encode) of the upload in argv[2], with the
# render.py in directory argv[1]; prints the peak RSS above the RSS before it (MiB), the time and the size.
RENDER_ONE = """
import io, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[1])
import render
from attribution.decode import decode_image

def kib(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])

data = Path(sys.argv[2]).read_bytes()
side = int(sys.argv[3])
heat = np.random.default_rng(0).normal(size=(14, 14))
crop = (0.0, 0.0, float(side), float(side))
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the render alone
start, t0 = kib("VmRSS"), time.monotonic()
if hasattr(render, "render_png"):
    png = render.render_png(data, heat, crop, legend=True, max_pixels=40_000_000)
else:  # renderers before render_png: the route decoded the whole image, then rendered it
    out = io.BytesIO()
    render.render_overlay(decode_image(data, max_pixels=40_000_000), heat, crop, legend=True).save(out, "PNG")
    png = out.getvalue()
print((kib("VmHWM") - start) / 1024, time.monotonic() - t0, *Image.open(io.BytesIO(png)).size)
"""

RENDER_INPUTS = [  # name, bytes, side
    ("6000x6000 grey PNG", lambda: png(6000, 6000), 6000),
    ("6324x6324 RGBA PNG", lambda: rgba_png(6324), 6324),
    ("6324x6324 RGB JPEG", lambda: noisy_jpeg(6324), 6324),
]


def render_only(ref: str, work: Path) -> None:
    """One legend render of each large upload in a fresh process: the renderer at ``ref`` and now."""
    print(f"\nOne heatmap render with legend, fresh process each (renderer at {ref} vs now)\n")
    print("| upload | renderer | peak RSS +MiB | time s | PNG size |\n|---|---|---|---|---|")
    old = work / "old"
    old.mkdir()
    (old / "render.py").write_text(
        subprocess.run(
            ["git", "show", f"{ref}:service/web/render.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for upload, make, side in RENDER_INPUTS:
        path = work / upload.replace(" ", "_")
        path.write_bytes(make())
        for name, directory in ((ref, old), ("current", ROOT / "service" / "web")):
            reply = subprocess.run(
                [sys.executable, "-c", RENDER_ONE, str(directory), str(path), str(side)],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            added, seconds, width, height = reply.stdout.split()
            row = [
                f"{upload} ({path.stat().st_size} B)",
                name,
                f"{float(added):.0f}",
                f"{float(seconds):.1f}",
            ]
            print(f"| {' | '.join(row)} | {width}x{height} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", help="git revision whose renderer to compare with (renders)")
    parser.add_argument("--render-only", action="store_true", help="only the --baseline-ref renders")
    parser.add_argument(
        "--only", action="append", default=[], metavar="WORD", help="run the cases whose name has WORD"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exclip-hostile-"))
    if args.baseline_ref:
        render_only(args.baseline_ref, work)
    if args.render_only:
        return 0
    cases = [c for c in CASES if not args.only or any(word in c[0] for word in args.only)]
    redis = RedisServer()
    redis.start()
    launcher = ServiceLauncher(redis.url, f"h{uuid.uuid4().hex[:8]}", save_tiny_checkpoint(work), work)
    try:
        print(
            f"\nHostile uploads: API + 1 worker (exclip-tiny, steps=2), fresh processes per case, private "
            f"redis-server, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
        )
        print(
            "| case | statuses | note | time s | API RSS before / peak +MiB | worker RSS before / peak +MiB |"
        )
        print("|---|---|---|---|---|---|")
        for name, make, caption, heatmaps, env in cases:
            image = make()
            api, worker = launcher.api(**env), launcher.worker()  # fresh: freed memory is not reused
            api.wait_ready(180)
            assert api.url is not None  # ServiceLauncher.api starts it with a port
            with Peak(api.proc.pid) as api_peak, Peak(worker.proc.pid) as worker_peak:
                t0 = time.monotonic()
                statuses, note = asyncio.run(_case(api.url, image, caption, heatmaps))
                elapsed = time.monotonic() - t0
            print(
                f"| {name} ({len(image)} B) | {' '.join(map(str, statuses))} | {note} | {elapsed:.1f} | "
                f"{api_peak.start / 1024:.0f} / +{api_peak.added_mib:.0f} | "
                f"{worker_peak.start / 1024:.0f} / +{worker_peak.added_mib:.0f} |"
            )
            for proc in (worker, api):
                proc.stop()
    finally:
        launcher.close()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
