"""Resident memory of an embedded ``serve`` process while it keeps jobs: many big uploads, one at a time.

Each request is a multipart ``POST /explain`` of the same large JPEG (about 6.8 MB of noise, so it
does not compress) with the tiny model; the process's RSS (``/proc/PID/status``) is read after the
service is ready and every ``--every`` requests. Without a bound every finished job keeps its image
for the whole result TTL; with ``EXCLIP_MAX_STORED_BYTES`` the growth stops near the budget. Give
``--code`` twice to compare two checkouts in one run; ``--budgets`` sets the budgets (MB) to try.

    python bench/retained_bytes.py --code . --code /path/to/older/checkout --budgets 512,100
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image

from testing import Process, free_port


def big_jpeg(target_bytes: int = 6_800_000) -> bytes:
    """Noise JPEG of about ``target_bytes`` (noise barely compresses: ~1.45 bytes per pixel at q=92)."""
    side = int((target_bytes / 1.45) ** 0.5)
    w, h = side * 4 // 3, side * 3 // 4
    noise = Image.frombytes("RGB", (w, h), random.Random(0).randbytes(w * h * 3))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def run(code: Path, budget_mb: int | None, requests: int, every: int, image: bytes) -> list[float]:
    log_dir = Path(tempfile.mkdtemp(prefix="exclip-retained-"))
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "EXCLIP_MODEL": "exclip-tiny",
        "EXCLIP_PRETRAINED": "none",
        "EXCLIP_DEVICE": "cpu",
    }
    env.pop("REDIS_URL", None)
    if budget_mb is not None:
        env["EXCLIP_MAX_STORED_BYTES"] = str(budget_mb * 1_000_000)
    cli = [
        sys.executable,
        "-c",
        f"import runpy, sys; sys.path.insert(0, {str(code)!r}); "
        "sys.argv[0] = 'exclip-service'; runpy.run_module('service.cli', run_name='__main__')",
    ]
    args = ["serve", "--port", str(port)]
    api = Process(args, env, log_dir, port, argv=[*cli, *args], name="api", new_session=True)
    try:
        api.wait_ready(timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        samples = [rss_mb(api.proc.pid)]
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(1, requests + 1):
                r = client.post(
                    "/explain",
                    files={"image": ("big.jpg", image, "image/jpeg")},
                    data={"caption": "a photo", "steps": "1", "wait": "60"},
                )
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
                if i % every == 0:
                    samples.append(rss_mb(api.proc.pid))
        return samples
    finally:
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", type=Path, help="checkout to run (repeatable)")
    parser.add_argument("--budgets", default="default", help="EXCLIP_MAX_STORED_BYTES in MB, or 'default'")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    image = big_jpeg()
    codes = args.code or [Path(__file__).resolve().parents[1]]
    budgets = [None if b == "default" else int(b) for b in args.budgets.split(",")]
    rows = [
        (code.resolve(), budget, run(code.resolve(), budget, args.requests, args.every, image))
        for code in codes
        for budget in budgets
    ]
    print(
        f"\nembedded serve, exclip-tiny, {len(image) / 1e6:.1f} MB JPEG per request, one at a time; "
        f"{platform.node()} ({os.cpu_count()} CPUs), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )
    marks = list(range(0, args.requests + 1, args.every))
    print("| code | EXCLIP_MAX_STORED_BYTES | " + " | ".join(f"RSS MB after {m}" for m in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for code, budget, samples in rows:
        label = "default" if budget is None else f"{budget} MB"
        print(f"| {code.name} | {label} | " + " | ".join(f"{s:.0f}" for s in samples) + " |")


if __name__ == "__main__":
    main()
