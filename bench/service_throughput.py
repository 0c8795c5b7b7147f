"""Service throughput: requests/s and client latency through HTTP -> Redis -> worker -> result.

For each model and batching mode this script starts its own processes on loopback — a private
``redis-server`` on a free port (no persistence), the API (``exclip-service serve`` with REDIS_URL)
and ONE worker (``exclip-service worker``) — sends a short warm-up, then a bounded number of
``POST /explain`` requests (multipart, ``wait`` long enough to get the 200 answer) from a bounded
number of concurrent clients, and prints one markdown table. Latency is client-side, from sending
the POST to the 200 with status ``done``; the mean batch size comes from the service's own
``/metrics`` (``exclip_batch_size`` sum/count over the measured requests only).

Requests cycle over several distinct images (sizes and pixels differ) and captions, so a batch is
made of different (image, caption) pairs. Each configuration has a time limit: once it is reached
no new request is sent (the in-flight ones finish), and the row says so. Every process started
here is stopped at the end, also on Ctrl-C / SIGTERM or an error.

    python bench/service_throughput.py                          # tiny + ViT-B-32, random weights
    python bench/service_throughput.py --models exclip-tiny --requests 200 --concurrency 1,8
    python bench/service_throughput.py --models ViT-B-16 --pretrained ViT-B-16=/path/to/ckpt.pt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from common import IMAGE_SIZES, ROOT, images, percentile, service_command

from testing import REDIS_SERVER, Process, RedisServer, free_port

# Defaults sized so the whole default run stays under ~10 minutes on 2 busy CPU cores.
DEFAULT_REQUESTS = {"exclip-tiny": 96}
OTHER_MODELS_REQUESTS = 24  # ViT-B-32 and bigger: seconds per explanation on CPU
BATCHING = {"on": {"EXCLIP_MAX_BATCH": "8"}, "off": {"EXCLIP_MAX_BATCH": "1", "EXCLIP_MAX_WAIT_MS": "0"}}
WAIT_S = 300  # per-request `wait`; the API's bound is raised to match

CAPTIONS = [
    "a dog",
    "a photo of a cat sleeping on a sofa",
    "two people riding bicycles along the beach at sunset",
    "a red car",
    "an aerial view of a city with tall buildings and a river",
    "a bowl of fruit on a wooden table",
    "a small bird sitting on a branch in the snow",
    "a plate of pasta",
]


@dataclass
class Row:
    model: str
    batching: str
    concurrency: int
    requests: int  # answered (200 or not); `planned` were meant to be sent
    planned: int
    ok: int
    failures: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p95_ms: float
    mean_batch: float
    stopped_by_time_limit: bool
    failure_examples: list[str] = field(default_factory=list)


def _batch_counters(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text
    values = {}
    for name in ("exclip_batch_size_sum", "exclip_batch_size_count"):
        match = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"/metrics has no {name}:\n{text[:2000]}")
        values[name] = float(match.group(1))
    return values["exclip_batch_size_sum"], values["exclip_batch_size_count"]


async def drive(
    url: str,
    n: int,
    concurrency: int,
    steps: int,
    images: list[bytes],
    time_limit_s: float | None,
    offset: int = 0,
) -> tuple[list[float], list[str], bool, float]:
    """Send ``n`` requests from ``concurrency`` clients; latencies of the good ones, failure texts."""
    latencies: list[float] = []
    failures: list[str] = []
    next_index = 0
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    stopped = False

    async def one(client: httpx.AsyncClient, i: int) -> None:
        image = images[i % len(images)]
        caption = CAPTIONS[i % len(CAPTIONS)]
        data = {"caption": caption, "steps": str(steps), "wait": str(WAIT_S)}
        t0 = time.perf_counter()
        try:
            files = {"image": (f"img{i}.jpg", image, "image/jpeg")}
            reply = await client.post("/explain", data=data, files=files)
        except httpx.HTTPError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - t0
        job = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
        if reply.status_code != 200 or job.get("status") != "done":
            failures.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
            return
        got = job["result"]["captions"]
        if len(got) != 1 or got[0]["caption"] != caption:  # the answer belongs to this request
            failures.append(f"wrong result for caption {caption!r}: {[c['caption'] for c in got]}")
            return
        latencies.append(elapsed)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, stopped
        while next_index < n:
            if deadline is not None and time.monotonic() > deadline:
                stopped = True
                return
            i = next_index
            next_index += 1
            await one(client, offset + i)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=WAIT_S + 30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies, failures, stopped, time.perf_counter() - t0


def run_config(
    log_dir: Path,
    redis_url: str,
    model: str,
    pretrained: str,
    batching: str,
    concurrency: int,
    n: int,
    args: argparse.Namespace,
    images: list[bytes],
) -> Row:
    prefix = f"bench{uuid.uuid4().hex[:8]}"  # fresh keys: metrics and queue start at zero
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "EXCLIP_KEY_PREFIX": prefix,
        "EXCLIP_MODEL": model,
        "EXCLIP_PRETRAINED": pretrained,
        "EXCLIP_DEVICE": "cpu",
        "EXCLIP_WAIT_MAX_S": str(WAIT_S),
        "EXCLIP_MAX_WAIT_MS": str(args.max_wait_ms),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **BATCHING[batching],
    }
    port = free_port()
    tag = f"{model}-{batching}-c{concurrency}"
    cmd = service_command()
    url = f"http://127.0.0.1:{port}"
    # Normally nothing is in flight when they stop; after an interrupt abandoned long polls would
    # hold the API, hence the short grace.
    with contextlib.ExitStack() as stack:
        api_args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        api = Process(
            api_args, env, log_dir, port, argv=[*cmd, *api_args], name=f"api-{tag}", new_session=True
        )
        stack.callback(api.stop, timeout_s=10)
        worker = Process(
            ["worker"], env, log_dir, argv=[*cmd, "worker"], name=f"worker-{tag}", new_session=True
        )
        stack.callback(worker.stop, timeout_s=10)
        api.wait_healthy(60)
        deadline = time.monotonic() + 180
        while True:  # /readyz: a worker advertises the model (it may take a while to load)
            if not worker.alive():
                raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker ready after 180s:\n{worker.log_tail()}")
            time.sleep(0.2)
        # Warm-up (not measured): first engine calls, connection pools, tokenizer caches.
        if args.warmup:
            _, warm_fail, _, _ = asyncio.run(
                drive(url, args.warmup, min(args.warmup, concurrency), args.steps, images, None, offset=1000)
            )
            if warm_fail:
                raise RuntimeError(f"warm-up failed: {warm_fail[0]}")
        with httpx.Client(base_url=url, timeout=10) as client:
            sum0, count0 = _batch_counters(client)
            latencies, failures, stopped, seconds = asyncio.run(
                drive(url, n, concurrency, args.steps, images, args.time_limit)
            )
            sum1, count1 = _batch_counters(client)
    latencies.sort()
    answered = len(latencies) + len(failures)
    return Row(
        model=model,
        batching=batching,
        concurrency=concurrency,
        requests=answered,
        planned=n,
        ok=len(latencies),
        failures=len(failures),
        seconds=seconds,
        req_per_s=len(latencies) / seconds if seconds > 0 else float("nan"),
        p50_ms=percentile(latencies, 0.5) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        mean_batch=(sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan"),
        stopped_by_time_limit=stopped,
        failure_examples=failures[:3],
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(rows: list[Row]) -> str:
    out = [
        "| model | batching | concurrency | requests | req/s | p50 ms | p95 ms | mean batch | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        requests = f"{r.requests}" + (f" of {r.planned} (time limit)" if r.stopped_by_time_limit else "")
        out.append(
            f"| {r.model} | {r.batching} | {r.concurrency} | {requests} | {r.req_per_s:.2f} | "
            f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.mean_batch:.2f} | {r.failures} |"
        )
    return "\n".join(out)


def _pretrained_map(values: list[str], models: list[str]) -> dict[str, str]:
    """``--pretrained X`` for every model, or ``--pretrained MODEL=X`` per model; default none."""
    out = dict.fromkeys(models, "none")
    for value in values:
        name, sep, tag = value.partition("=")
        if sep and name in out:
            out[name] = tag
        elif sep:
            raise SystemExit(f"--pretrained {value!r}: {name!r} is not one of --models {','.join(models)}")
        else:
            out = dict.fromkeys(models, value)
    return out


def _int_list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",")]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive integers separated by commas, e.g. 1,8")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--models", default="exclip-tiny,ViT-B-32", help="comma-separated open_clip architectures")
    p.add_argument(
        "--pretrained",
        action="append",
        default=[],
        help="tag, checkpoint path or none for all models, or MODEL=TAG|PATH (repeatable); "
        "default none (random weights)",
    )
    p.add_argument(
        "--requests",
        type=int,
        help=f"measured requests per configuration (default {DEFAULT_REQUESTS['exclip-tiny']} "
        f"for exclip-tiny, {OTHER_MODELS_REQUESTS} for other models)",
    )
    p.add_argument(
        "--concurrency", type=_int_list, default=[8], help="concurrent clients, e.g. 1,8 (default 8)"
    )
    p.add_argument("--steps", type=int, default=10, help="integration steps per explanation (default 10)")
    p.add_argument("--batching", default="on,off", help="on (EXCLIP_MAX_BATCH=8), off (=1), or both")
    p.add_argument("--max-wait-ms", type=int, default=50, help="EXCLIP_MAX_WAIT_MS with batching on")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (default 2)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=150.0,
        help="seconds per configuration after which no new request is sent (default 150)",
    )
    p.add_argument("--json", help="also write the rows and the run's details as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    if not models or any(m not in BATCHING for m in modes) or not modes:
        raise SystemExit("--models needs at least one model; --batching takes on, off or on,off")
    if not os.path.exists(REDIS_SERVER):
        raise SystemExit(f"{REDIS_SERVER} not found (apt-get install redis-server)")
    pretrained = _pretrained_map(args.pretrained, models)
    jpegs = images()

    # SIGTERM runs the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="exclip-bench-"))
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    load_before = os.getloadavg()
    rows: list[Row] = []
    redis = RedisServer()
    try:
        redis.start()
        redis_url = redis.url
        for model in models:
            n = args.requests or DEFAULT_REQUESTS.get(model, OTHER_MODELS_REQUESTS)
            for mode in modes:
                for concurrency in args.concurrency:
                    print(
                        f"... {model} batching {mode} concurrency {concurrency}: {n} requests",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(
                        run_config(
                            log_dir, redis_url, model, pretrained[model], mode, concurrency, n, args, jpegs
                        )
                    )
                    print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"interrupted; stopping the processes (logs in {log_dir})", file=sys.stderr)
        return 130
    except BaseException:
        print(f"failed; process logs in {log_dir}", file=sys.stderr)
        raise
    finally:
        redis.stop()
    load_after = os.getloadavg()
    shutil.rmtree(log_dir, ignore_errors=True)

    print(
        f"date: {started.isoformat(timespec='seconds')}; host: {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"torch on CPU; load average 1 min {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        f"(other jobs share this machine); whole run {time.monotonic() - t_start:.0f} s"
    )
    print(f"command: {' '.join(['python', 'bench/service_throughput.py', *(argv or sys.argv[1:])])}")
    print(
        f"setup: one redis-server, one API, one worker per row, all on 127.0.0.1; weights: "
        f"{', '.join(f'{m}={p}' for m, p in pretrained.items())}; steps {args.steps}; "
        f"batching on = EXCLIP_MAX_BATCH=8, EXCLIP_MAX_WAIT_MS={args.max_wait_ms}; "
        "off = EXCLIP_MAX_BATCH=1; "
        f"{args.warmup} warm-up requests per row; {len(jpegs)} distinct images "
        f"({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)} JPEG), {len(CAPTIONS)} distinct captions, "
        f"request i uses image i mod {len(jpegs)} and caption i mod {len(CAPTIONS)}; "
        "one caption per request, "
        "format json; latency = client-side POST /explain (wait) to 200; req/s = good answers / wall time; "
        "mean batch from /metrics exclip_batch_size over the measured requests"
    )
    print()
    print(_table(rows))
    for r in rows:
        for example in r.failure_examples:
            print(f"failure ({r.model}, batching {r.batching}): {example}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": started.isoformat(),
                    "cpus": os.cpu_count(),
                    "cpu": _cpu_model(),
                    "load_before": load_before,
                    "load_after": load_after,
                    "argv": argv or sys.argv[1:],
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
