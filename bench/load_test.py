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

    python bench/load_test.py                                # 300 requests at 10/s, TTL 20 s
    python bench/load_test.py --requests 120 --rate 5 --result-ttl 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CAPTIONS = ["a dog", "a photo of a cat on a sofa", "two people riding bicycles", "a red car at night",
            "an aerial view of a city"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images() -> list[bytes]:
    out = []
    for i, (w, h) in enumerate([(64, 48), (40, 40), (120, 80), (33, 57)]):
        img = Image.effect_noise((w, h), 40 + 10 * i).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _tiny_checkpoint(directory: Path) -> str:
    import open_clip
    import torch

    from attribution.models import TINY_MODEL  # registers the architecture

    torch.manual_seed(0)
    path = directory / "exclip-tiny.pt"
    torch.save(open_clip.create_model(TINY_MODEL, pretrained=None).state_dict(), path)
    return str(path)


class Processes:
    """Every subprocess started here, with its output in a log file; all stopped by ``stop_all``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.procs = log_dir, {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child writes to it
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 20) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


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


async def _one(client: httpx.AsyncClient, i: int, images: list[bytes], steps: int, out: Outcome,
               deadline: float) -> None:
    t0 = time.monotonic()
    data = {"caption": CAPTIONS[i % len(CAPTIONS)], "steps": str(steps), "wait": "30"}
    try:
        r = await client.post("/explain", files={"image": (f"{i}.png", images[i % len(images)])}, data=data)
        job = r.json()
        while r.status_code == 202 and time.monotonic() < deadline:  # not done within `wait`: poll
            await asyncio.sleep(0.5)
            r = await client.get(f"/jobs/{job['id']}")
            job = r.json()
            if job["status"] not in ("queued", "running"):
                break
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


def run(args: argparse.Namespace, procs: Processes, work: Path) -> int:
    checkpoint = _tiny_checkpoint(work)
    redis_port, api_port = _free_port(), _free_port()
    procs.start("redis", [REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"])
    r = redis.Redis(port=redis_port, decode_responses=True, socket_timeout=5)
    _wait("redis-server", r.ping, 10)
    prefix = f"load{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "EXCLIP_KEY_PREFIX": prefix,
           "EXCLIP_MODEL": "exclip-tiny", "EXCLIP_PRETRAINED": checkpoint, "EXCLIP_DEVICE": "cpu",
           "EXCLIP_RESULT_TTL_S": str(args.result_ttl), "EXCLIP_VISIBILITY_TIMEOUT_S": str(args.visibility),
           "EXCLIP_HEARTBEAT_S": "1", "EXCLIP_MAX_QUEUE": str(args.requests * 2),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "service.cli"]
    procs.start("api", [*cli, "serve", "--port", str(api_port)], env)
    for name in ("w1", "w2"):
        procs.start(name, [*cli, "worker"], {**env, "EXCLIP_WORKER_NAME": name})
    url = f"http://127.0.0.1:{api_port}"

    def two_workers() -> bool:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200 and \
            "exclip_workers 2.0" in httpx.get(url + "/metrics", timeout=5).text

    _wait("the API and two workers", two_workers, 180)
    before = _redis_state(r, prefix)
    killed_at: list[float] = []

    def kill_w1() -> None:
        procs.procs["w1"].send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    t0 = time.monotonic()
    out = asyncio.run(_drive(url, args.requests, args.rate, args.steps, kill_w1,
                             args.requests / args.rate + args.drain_s))
    elapsed = time.monotonic() - t0
    right_after = _redis_state(r, prefix)
    stream = f"{prefix}:stream:exclip-tiny"
    pending = r.xpending(stream, "workers")["pending"] if r.exists(stream) else 0
    time.sleep(args.result_ttl + 3)  # every job record, image and the stream expire in this time
    after_ttl = _redis_state(r, prefix)
    left = sorted(k.removeprefix(prefix + ":") for k in r.scan_iter(f"{prefix}:*"))

    lost = args.requests - out.answered - len(out.failed)
    latency = (_pct(out.latencies, .5), _pct(out.latencies, .95), max(out.latencies, default=float("nan")))
    mib = 2 ** 20
    rows = [
        ("requests sent", f"{args.requests} at {args.rate:g}/s over {args.requests / args.rate:.0f} s"),
        ("answered", str(out.answered)),
        ("failed", str(len(out.failed))),
        ("lost", str(lost)),
        ("latency p50 / p95 / max", " / ".join(f"{v * 1000:.0f}" for v in latency) + " ms"),
        ("worker w1 SIGKILLed", f"after request {args.requests // 2 + 1}, {killed_at[0] - t0:.1f} s in"),
        ("run time (send + drain)", f"{elapsed:.1f} s"),
        ("pending entries at the end", str(pending)),
        ("Redis used_memory before / right after / after TTL",
         " / ".join(f"{m / mib:.2f} MiB" for m in (before[0], right_after[0], after_ttl[0]))),
        ("keys before / right after / after TTL", f"{before[1]} / {right_after[1]} / {after_ttl[1]}"),
        ("keys left after TTL", ", ".join(left)),
    ]
    print(f"\nLoad test: API + 2 workers (exclip-tiny, steps={args.steps}), private redis-server, "
          f"EXCLIP_RESULT_TTL_S={args.result_ttl}, EXCLIP_VISIBILITY_TIMEOUT_S={args.visibility}\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for line in out.failed[:10]:
        print("failed:", line)
    took_over = "took over" in (work / "logs" / "w2.log").read_text(errors="replace")
    print(f"\nw2 took over w1's unacknowledged jobs: {'yes' if took_over else 'no (none were pending)'}")
    return 1 if lost or out.failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--result-ttl", dest="result_ttl", type=int, default=20, help="EXCLIP_RESULT_TTL_S")
    p.add_argument("--visibility", type=float, default=3.0, help="EXCLIP_VISIBILITY_TIMEOUT_S")
    p.add_argument("--drain-s", dest="drain_s", type=float, default=60.0,
                   help="time after the last send for the answers to come")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="exclip-load-"))
    (work / "logs").mkdir()
    procs = Processes(work / "logs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        return run(args, procs, work)
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"load test aborted: {exc}", file=sys.stderr)
        for name in procs.procs:
            print(f"--- {name} ---\n{procs.tail(name)}", file=sys.stderr)
        return 2
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
