"""Library-level cost of hostile inputs: image decode + preprocess, and caption tokenisation.

Each measurement runs in its own process: the process imports the library, builds the model's
transform and reads the input, then resets its peak resident size (Linux ``clear_refs``), times the
work (best of up to three runs while they take under a second) and reports how far the peak rose above
the resident size before the work ("added peak MB"). Image work is ``decode_image`` + ``preprocess``
(or the fused ``prepare_image`` where the library has it); caption work is ``tokenize_caption``. Each
child is capped at its address space after imports + ``--cap-gb`` (default 3 GB), so a blow-up shows as
"out of memory at the cap" instead of taking the machine down, and at ``--timeout`` seconds.

``--before DIR`` runs the same cases against another copy of the ``attribution`` package (e.g. an
older commit exported with ``git archive``), side by side in the same run:

    mkdir -p ../exclip-before && git archive 6f4c82b attribution | tar -x -C ../exclip-before
    python bench/input_costs.py --before ../exclip-before

``--after DIR`` measures another copy instead of this tree (e.g. a snapshot, so that editing the tree
during a long run does not mix versions).

Times are also given in image-forward units: the best of three forward passes of one image through a
random-weight ViT-B-16 image tower, measured in this process at the start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, builder name, args): images are written once into the cache directory.
IMAGES = [
    ("640x480 JPEG photo-like", "noise_jpeg", (640, 480)),
    ("1x250000 grey PNG", "flat_png", (1, 250_000, "L")),
    ("250000x1 grey PNG", "flat_png", (250_000, 1, "L")),
    ("6000x6000 grey PNG (36 MP)", "flat_png", (6000, 6000, "L")),
    ("7300x5475 JPEG (40 MP)", "gradient_jpeg", (7300, 5475)),
    ("6324x6324 RGBA PNG (40 MP)", "flat_png", (6324, 6324, "RGBA")),
    ("6324x6324 16-bit grey PNG (40 MP)", "flat_png", (6324, 6324, "I;16")),
]
CAPTIONS = [
    ("plain 16 words", "a photo of a brown dog with a red ball on the green grass in the park today"),
    ("'&' + 'amp;'*4000 + ' dog' (16 KB)", "&" + "amp;" * 4000 + " dog"),
    ("'&' + 'amp;'*248 + ' dog' (997 chars: the worst accepted)", "&" + "amp;" * 248 + " dog"),
    ("'a'*16000 (16 KB, one word)", "a" * 16000),
    ("'&#38;'*2000 (10 KB)", "&#38;" * 2000),
]
TRANSFORMS = {"exclip-tiny (32 px)": ((32, 32), 8), "ViT-B-16 transform (224 px)": ((224, 224), 16)}
MAX_PIXELS = 40_000_000


def _build_image(kind: str, args: tuple) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if kind == "flat_png":
        w, h, mode = args
        fill = 30_000 if mode == "I;16" else (128 if mode == "L" else (200, 100, 50, 128))
        Image.new(mode, (w, h), fill).save(buf, "PNG")
    elif kind == "gradient_jpeg":
        w, h = args
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    elif kind == "noise_jpeg":
        w, h = args
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _child(spec: dict) -> dict:
    """Runs in the measuring process (PYTHONPATH points at the implementation under test)."""
    import dataclasses

    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from attribution import decode, images, text
    from attribution.errors import AttributionError
    from attribution.models import TINY_MODEL, load_model

    torch.manual_seed(0)
    loaded = load_model(TINY_MODEL, None)
    if spec["kind"] == "image":
        size, patch = spec["size"], spec["patch"]
        transform = image_transform_v2(PreprocessCfg(size=tuple(size)), is_train=False)
        loaded = dataclasses.replace(
            loaded,
            transform=transform,
            image_size=tuple(size),
            patch_size=(patch, patch),
            grid=(size[0] // patch, size[1] // patch),
        )
        data = Path(spec["path"]).read_bytes()
        fused = getattr(images, "prepare_image", None)

        def work() -> str:
            if fused is not None:
                tensor = fused(data, loaded, max_pixels=MAX_PIXELS).tensor
            else:
                tensor, _ = images.preprocess(decode.decode_image(data, max_pixels=MAX_PIXELS), loaded)
            return f"tensor {tuple(tensor.shape)}"
    else:
        caption = spec["caption"]

        def work() -> str:
            _, tokens = text.tokenize_caption(caption, loaded)
            return f"{len(tokens)} tokens"

    status = open("/proc/self/status").read()
    vm_size_kb = int(status.split("VmSize:")[1].split()[0])
    cap = vm_size_kb * 1024 + int(spec["cap_gb"] * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    seconds, outcome, added = float("inf"), "", 0.0
    for attempt in range(3):  # best of up to three runs, while they are quick
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident size (VmHWM) to the current one
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        try:
            outcome = work()
        except AttributionError as exc:
            outcome = f"refused: {type(exc).__name__}: {str(exc)[:90]}"
        except MemoryError:
            outcome = f"out of memory at the cap (+{spec['cap_gb']} GB address space)"
        elapsed = time.perf_counter() - start
        seconds = min(seconds, elapsed)
        added = max(added, (_status_kb("VmHWM") - before) / 1024)
        if elapsed > 1.0 or attempt == 2 or "out of memory" in outcome:
            break
    return {"seconds": seconds, "added_mb": added, "outcome": outcome}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{field}:")[1].split()[0])


def _measure(src: Path, spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": timeout, "added_mb": float("nan"), "outcome": f"killed after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"seconds": float("nan"), "added_mb": float("nan"), "outcome": f"crashed: {tail[:90]}"}
    return json.loads(lines[-1])


def _forward_unit() -> float:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    image = torch.randn(1, 3, 224, 224)
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model.encode_image(image)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="directory holding an older attribution package")
    parser.add_argument("--after", type=Path, default=ROOT, help="package to measure (default: this tree)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "exclip-input-costs")
    parser.add_argument("--cap-gb", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--only", choices=("images", "captions"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    import torch

    torch.set_num_threads(1)
    unit = _forward_unit()
    impls = [("before", args.before)] if args.before else []
    impls.append(("after" if args.before else "this", args.after))
    args.cache.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"one ViT-B-16 image forward (1 thread) = {unit * 1000:.0f} ms\n"
    )

    rows = []
    if args.only != "captions":
        for label, kind, build_args in IMAGES:
            path = args.cache / (label.replace(" ", "_").replace("/", "-") + ".bin")
            if not path.exists():
                path.write_bytes(_build_image(kind, build_args))
            for tname, (size, patch) in TRANSFORMS.items():
                spec = {
                    "kind": "image",
                    "path": str(path),
                    "size": size,
                    "patch": patch,
                    "cap_gb": args.cap_gb,
                }
                for impl, src in impls:
                    r = _measure(src, spec, args.timeout)
                    rows.append((f"{label}, {path.stat().st_size} B", tname, impl, r))
    if args.only != "images":
        for label, caption in CAPTIONS:
            spec = {"kind": "caption", "caption": caption, "cap_gb": args.cap_gb}
            for impl, src in impls:
                rows.append((label, "tokenize_caption", impl, _measure(src, spec, args.timeout)))

    print("| input | work | code | seconds | image forwards | added peak MB | outcome |")
    print("|---|---|---|---|---|---|---|")
    for label, work, impl, r in rows:
        print(
            f"| {label} | {work} | {impl} | {r['seconds']:.3f} | {r['seconds'] / unit:.1f} | "
            f"{r['added_mb']:.0f} | {r['outcome']} |"
        )


if __name__ == "__main__":
    main()
