"""Bounded load test: a steady stream of requests against API + two workers, one worker SIGKILLed midway.

Everything runs on loopback and is started here: a private ``redis-server`` on a free port (no
persistence), the API (``python -m service.cli serve`` with REDIS_URL) and two workers with the tiny
model (``exclip-tiny``, weights saved once so both workers hold the same model). Requests are
``POST /explain`` (multipart, a long ``wait``; a 202 is followed by polling ``GET /jobs/{id}``), sent
at a fixed rate; when half of them are sent, worker ``w1`` gets SIGKILL — its unacknowledged jobs must
be taken over by ``w2`` after the visibility timeout. The script prints one table: requests sent,
answered, failed, lost (no final answer; must be 0), client latency p50/p95/max, and Redis
``used_memory`` and key count (keys under the run's prefix) before, right after, and once the result
TTL has passed. It stops by itself (each phase has a deadline) and stops every process it started,
also on Ctrl-C. Exit code 1 if a request was lost or failed.

    python bench/load.py                                # 300 requests at 10/s, TTL 20 s
    python bench/load.py --requests 120 --rate 5 --result-ttl 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from PIL import Image

from testing import RedisServer, ServiceLauncher, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

CAPTIONS = [
    "a dog",
    "a photo of a cat on a sofa",
    "two people riding bicycles",
    "a red car at night",
    "an aerial view of a city",
]


def _images() -> list[bytes]:
    out = []
    for i, (w, h) in enumerate([(64, 48), (40, 40), (120, 80), (33, 57)]):
        img = Image.effect_noise((w, h), 40 + 10 * i).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    failed: list[str] = field(default_factory=list)


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _redis_state(r: redis.Redis, prefix: str) -> tuple[int, int]:
    """(used_memory bytes, keys under the prefix)."""
    return int(r.info("memory")["used_memory"]), sum(1 for _ in r.scan_iter(f"{prefix}:*", count=1000))


async def _one(
    client: httpx.AsyncClient, i: int, images: list[bytes], steps: int, out: Outcome, deadline: float
) -> None:
    t0 = time.monotonic()
    data = {"caption": CAPTIONS[i % len(CAPTIONS)], "steps": str(steps), "wait": "30"}
    try:
        r = await client.post("/explain", files={"image": (f"{i}.png", images[i % len(images)])}, data=data)
        job = r.json()
        while (
            r.status_code in (200, 202)
            and job.get("status") in ("queued", "running")
            and time.monotonic() < deadline
        ):  # not done within `wait`: poll until it is
            await asyncio.sleep(0.5)
            r = await client.get(f"/jobs/{job['id']}")
            job = r.json()
    except httpx.HTTPError as exc:
        out.failed.append(f"request {i}: {type(exc).__name__}: {exc}")
        return
    if r.status_code == 202 or job.get("status") in ("queued", "running"):
        return  # no final answer before the deadline: counted as lost
    out.answered += 1
    if r.status_code == 200 and job.get("status") == "done" and job["result"]["captions"]:
        out.latencies.append(time.monotonic() - t0)
    else:
        out.failed.append(f"request {i}: HTTP {r.status_code}: {job.get('detail') or job.get('error')}")


async def _drive(url: str, n: int, rate: float, steps: int, on_half, deadline_s: float) -> Outcome:
    images, out = _images(), Outcome()
    deadline = time.monotonic() + deadline_s
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = []
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))  # steady rate, no drift
            tasks.append(asyncio.create_task(_one(client, i, images, steps, out, deadline)))
            if i == n // 2:
                on_half()
        await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(args: argparse.Namespace, server: RedisServer, launcher: ServiceLauncher) -> int:
    r, prefix = server.client(), launcher.key_prefix
    env = {
        "EXCLIP_RESULT_TTL_S": str(args.result_ttl),
        "EXCLIP_VISIBILITY_TIMEOUT_S": str(args.visibility),
        "EXCLIP_HEARTBEAT_S": "1",
        "EXCLIP_MAX_QUEUE": str(args.requests * 2),
    }
    url = launcher.api(**env).url
    assert url is not None  # ServiceLauncher.api starts it with a port
    workers = {name: launcher.worker(**env, EXCLIP_WORKER_NAME=name) for name in ("w1", "w2")}

    def two_workers() -> bool:
        return (
            httpx.get(url + "/readyz", timeout=5).status_code == 200
            and "exclip_workers 2.0" in httpx.get(url + "/metrics", timeout=5).text
        )

    _wait("the API and two workers", two_workers, 180)
    before = _redis_state(r, prefix)
    killed_at: list[float] = []

    def kill_w1() -> None:
        workers["w1"].send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    t0 = time.monotonic()
    out = asyncio.run(
        _drive(url, args.requests, args.rate, args.steps, kill_w1, args.requests / args.rate + args.drain_s)
    )
    elapsed = time.monotonic() - t0
    right_after = _redis_state(r, prefix)
    stream = f"{prefix}:stream:exclip-tiny"
    pending = r.xpending(stream, "workers")["pending"] if r.exists(stream) else 0
    time.sleep(args.result_ttl + 3)  # every job record, image and the stream expire in this time
    after_ttl = _redis_state(r, prefix)
    left = sorted(k.removeprefix(prefix + ":") for k in r.scan_iter(f"{prefix}:*"))

    lost = args.requests - out.answered - len(out.failed)
    latency = (_pct(out.latencies, 0.5), _pct(out.latencies, 0.95), max(out.latencies, default=float("nan")))
    mib = 2**20
    rows = [
        ("requests sent", f"{args.requests} at {args.rate:g}/s over {args.requests / args.rate:.0f} s"),
        ("answered", str(out.answered)),
        ("failed", str(len(out.failed))),
        ("lost", str(lost)),
        ("latency p50 / p95 / max", " / ".join(f"{v * 1000:.0f}" for v in latency) + " ms"),
        ("worker w1 SIGKILLed", f"after request {args.requests // 2 + 1}, {killed_at[0] - t0:.1f} s in"),
        ("run time (send + drain)", f"{elapsed:.1f} s"),
        ("pending entries at the end", str(pending)),
        (
            "Redis used_memory before / right after / after TTL",
            " / ".join(f"{m / mib:.2f} MiB" for m in (before[0], right_after[0], after_ttl[0])),
        ),
        ("keys before / right after / after TTL", f"{before[1]} / {right_after[1]} / {after_ttl[1]}"),
        ("keys left after TTL", ", ".join(left)),
    ]
    print(
        f"\nLoad test: API + 2 workers (exclip-tiny, steps={args.steps}), private redis-server, "
        f"EXCLIP_RESULT_TTL_S={args.result_ttl}, EXCLIP_VISIBILITY_TIMEOUT_S={args.visibility}\n"
    )
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for line in out.failed[:10]:
        print("failed:", line)
    took_over = "took over" in workers["w2"].output
    print(f"\nw2 took over w1's unacknowledged jobs: {'yes' if took_over else 'no (none were pending)'}")
    return 1 if lost or out.failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--result-ttl", dest="result_ttl", type=int, default=20, help="EXCLIP_RESULT_TTL_S")
    p.add_argument("--visibility", type=float, default=3.0, help="EXCLIP_VISIBILITY_TIMEOUT_S")
    p.add_argument(
        "--drain-s",
        dest="drain_s",
        type=float,
        default=60.0,
        help="time after the last send for the answers to come",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="exclip-load-"))
    server = RedisServer()
    launcher = ServiceLauncher(server.url, f"load{uuid.uuid4().hex[:8]}", save_tiny_checkpoint(work), work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        server.start()
        return run(args, server, launcher)
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"load test aborted: {exc}", file=sys.stderr)
        for proc in launcher.processes:
            print(f"--- {' '.join(proc.args)} ---\n{proc.output[-3000:]}", file=sys.stderr)
        return 2
    finally:
        launcher.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
