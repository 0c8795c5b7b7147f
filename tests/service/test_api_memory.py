"""The API process's resident memory returns near its baseline after a burst of large uploads.

A burst of 24 concurrent requests, each a ~3 MB noisy PNG (the API reads, size-checks and stores every
upload, then waits for the result): an API that kept uploads, decoded images or results per request
would grow by tens of MB and stay there.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import yaml
from PIL import Image

from testing import ROOT

BURST = 24
# Measured 2026-11-28 on the 2-core machine, two bursts after a warm-up: +5 MB after each with the
# allocator settings docker-compose.yml gives the API. With glibc's default, dynamic mmap threshold the
# same bursts left +17 to +62 MB: memory the allocator keeps for reuse, not objects (a second burst did
# not add to it). The bound fails if a third of the burst's ~72 MB of uploads stayed resident.
RETAINED_BOUND_MB = 25


def _deployed_malloc_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["api"]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("MALLOC_")}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _noisy_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_api_memory_returns_near_its_baseline_after_a_burst(launcher):
    # The allocator settings the deployment gives the API (few malloc arenas, a fixed mmap threshold:
    # large buffers freed go back to the OS at once, so the resident set shows what the process holds,
    # not what glibc keeps for later).
    api = launcher.api(**_deployed_malloc_env())
    launcher.worker()
    api.wait_ready()
    images = [_noisy_png(seed) for seed in range(4)]

    def explain(i: int) -> int:
        r = httpx.post(
            api.url + "/explain",
            files={"image": ("x.png", images[i % len(images)])},
            data={"caption": f"a photo number {i}", "steps": "1", "wait": "120"},
            timeout=180,
        )
        return r.status_code

    with ThreadPoolExecutor(4) as pool:  # warm: the allocator's pools as any running API has them
        assert list(pool.map(explain, range(4))) == [200] * 4
    baseline = _rss_mb(api.proc.pid)
    for burst in range(2):
        with ThreadPoolExecutor(BURST) as pool:
            assert list(pool.map(explain, range(BURST))) == [200] * BURST
        time.sleep(1)
        after = _rss_mb(api.proc.pid)
        assert after - baseline <= RETAINED_BOUND_MB, (burst, baseline, after)
    assert api.alive()
