"""Client latency beyond the engine: what one request at a time waits on top of its ``compute_ms``.

For each code tree (``--code``, default this checkout; give another checkout to compare side by side
in one run), each queue mode (embedded: one ``serve`` process; redis: a private ``redis-server``,
``serve`` and one ``worker``) and each ``EXCLIP_MAX_WAIT_MS``, this script starts the processes, waits
for ``/readyz``, connects (one ``GET /healthz``: the client's own connection set-up is not the
service's), sends the FIRST request at once (a cold worker or API makes it slow), then ``--requests``
more, one at a time, each a multipart ``POST /explain`` that waits for its 200. Per request it takes
the client-side latency and the job's own ``timings.compute_ms`` (the engine call); the overhead is
the difference. ``--repeats`` starts everything that many times per row (the first request is one
sample per start). One markdown table; every process started here is stopped at the end.

    python bench/latency.py                                   # tiny model, both modes, this checkout
    python bench/latency.py --code . --code /path/to/older/checkout --max-wait-ms 0,20 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from common import images

from testing import Process, RedisServer, free_port

CAPTION = "a photo of a cat sleeping on a sofa"


@dataclass
class Row:
    code: str
    mode: str
    max_wait_ms: int
    requests: int
    first_ms: float
    first_overhead_ms: float
    tenth_ms: float
    latency_p50_ms: float
    compute_p50_ms: float
    overhead_p50_ms: float
    overhead_p90_ms: float


def _start(
    stack: contextlib.ExitStack,
    log_dir: Path,
    code: Path,
    model: str,
    max_wait_ms: int,
    redis_url: str | None,
) -> str:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "EXCLIP_MODEL": model,
        "EXCLIP_PRETRAINED": "none",
        "EXCLIP_DEVICE": "cpu",
        "EXCLIP_MAX_WAIT_MS": str(max_wait_ms),
        "EXCLIP_KEY_PREFIX": f"lat{port}",
    }
    env.pop("REDIS_URL", None)
    # `python -m` would import `service` from the working directory (this checkout) whatever PYTHONPATH
    # says; put the chosen checkout first instead.
    cli = [
        sys.executable,
        "-c",
        f"import runpy, sys; sys.path.insert(0, {str(code)!r}); "
        "sys.argv[0] = 'exclip-service'; runpy.run_module('service.cli', run_name='__main__')",
    ]

    def start(args: list[str], port: int | None = None) -> Process:
        proc = Process(args, env, log_dir, port, argv=[*cli, *args], name=args[0], new_session=True)
        stack.callback(proc.stop)  # stopped when the stack closes, last started first
        return proc

    if redis_url is not None:
        env["REDIS_URL"] = redis_url
        start(["worker"])
    start(["serve", "--port", str(port)], port).wait_ready(timeout_s=300)
    return f"http://127.0.0.1:{port}"


def _one(client: httpx.Client, image: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = client.post(
        "/explain", files={"image": ("x.jpg", image, "image/jpeg")}, data={"caption": CAPTION, "wait": "60"}
    )
    latency_ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200 or r.json()["status"] != "done":
        raise RuntimeError(f"request failed ({r.status_code}): {r.text[:500]}")
    return latency_ms, r.json()["result"]["captions"][0]["timings"]["compute_ms"]


def measure(code: Path, mode: str, model: str, max_wait_ms: int, requests: int) -> Row:
    log_dir = Path(tempfile.mkdtemp(prefix="exclip-latency-"))
    with contextlib.ExitStack() as stack:  # API and worker stopped before Redis
        redis_url = None
        if mode == "redis":
            redis = RedisServer()
            stack.callback(redis.stop)
            redis.start()
            redis_url = redis.url
        url = _start(stack, log_dir, code, model, max_wait_ms, redis_url)
        image = images()[0]
        with httpx.Client(base_url=url, timeout=120) as client:
            client.get("/healthz").raise_for_status()
            samples = [_one(client, image) for _ in range(requests + 1)]
    latencies = [lat for lat, _ in samples]
    overheads = sorted(lat - comp for lat, comp in samples[1:])
    return Row(
        code=str(code),
        mode=mode,
        max_wait_ms=max_wait_ms,
        requests=requests,
        first_ms=latencies[0],
        first_overhead_ms=samples[0][0] - samples[0][1],
        tenth_ms=latencies[min(9, len(latencies) - 1)],
        latency_p50_ms=statistics.median(latencies[1:]),
        compute_p50_ms=statistics.median(comp for _, comp in samples[1:]),
        overhead_p50_ms=statistics.median(overheads),
        overhead_p90_ms=overheads[int(0.9 * (len(overheads) - 1))],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", type=Path, help="checkout to run (repeatable)")
    parser.add_argument("--modes", default="embedded,redis")
    parser.add_argument("--model", default="exclip-tiny")
    parser.add_argument("--max-wait-ms", default="0", help="comma-separated EXCLIP_MAX_WAIT_MS values")
    parser.add_argument("--requests", type=int, default=40, help="measured requests after the first")
    parser.add_argument("--repeats", type=int, default=1, help="starts per row (one first request each)")
    args = parser.parse_args()
    codes = args.code or [Path(__file__).resolve().parents[1]]
    rows = [
        measure(code.resolve(), mode, args.model, int(wait), args.requests)
        for code in codes
        for mode in args.modes.split(",")
        for wait in args.max_wait_ms.split(",")
        for _ in range(args.repeats)
    ]
    print(
        f"\n{args.model}, one request at a time; {platform.node()} ({os.cpu_count()} CPUs), "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )
    print(
        "| code | mode | max_wait_ms | first ms | first overhead ms | 10th ms | latency p50 ms "
        "| compute p50 ms | overhead p50 ms | overhead p90 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r.code).name} | {r.mode} | {r.max_wait_ms} | {r.first_ms:.0f} | "
            f"{r.first_overhead_ms:.1f} | {r.tenth_ms:.0f} | "
            f"{r.latency_p50_ms:.1f} | {r.compute_p50_ms:.1f} | {r.overhead_p50_ms:.1f} | "
            f"{r.overhead_p90_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
