"""Time and peak memory of ``/label-studio/predict`` image downloads from a sick Label Studio host.

The host is a real HTTP server on loopback (in this process); each case runs in a fresh Python
process that downloads with ``service.label_studio.fetch.ImageFetcher`` as the predictor does (a call's
images with ``fetch_all``, the call's deadline when the code has one, the process's download limit
when it has one), so its peak RSS is the downloads' alone. ``--code DIR`` runs a case against another
checkout's code (e.g. ``git archive <rev> service attribution | tar -x -C DIR``) for a before/after
table; old code without a deadline (before 46a2435, BENCHMARKS.md's "before" rows: ``<rev>`` =
``46a2435^``) is cut off by the bench at ``--cap-s``.

Cases:
- ``trickle``: one call, one image; the host declares 1000 bytes and sends one every 0.5 s (each read
  well within httpx's timeout); the call's budget is 5 s.
- ``stalled``: ten concurrent calls of four images each; every body stops 1000 bytes short of the
  5 MB size limit and then sends one byte every 0.5 s; the calls' budget is 10 s.

    python bench/label_studio_downloads.py
    python bench/label_studio_downloads.py --code /tmp/old --label before --code . --label after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LIMIT = 5_000_000
CASES = {
    # name: (calls, images per call, body size, bytes sent at once, seconds per further byte, budget)
    "trickle": (1, 1, 1000, 0, 0.5, 5.0),
    "stalled": (10, 4, LIMIT, LIMIT - 1000, 0.5, 10.0),
}


class _Host(BaseHTTPRequestHandler):
    size, at_once, pace = 0, 0, 0.5
    prefix = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        try:
            self.wfile.write(self.prefix)
            for _ in range(self.size - self.at_once):
                time.sleep(self.pace)
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:  # the client went away
            pass

    def log_message(self, *args: object) -> None:
        pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def _child(url: str, case: str, cap_s: float) -> dict:
    from service.label_studio import fetch

    calls, per_call, _, _, _, budget = CASES[case]
    # The per-process download bound (Downloads) and the call deadline came in one commit (46a2435);
    # code before it, the "before" rows of BENCHMARKS.md, takes neither keyword.
    downloads = fetch.Downloads() if hasattr(fetch, "Downloads") else None
    refs = [f"/img{i}.png" for i in range(per_call)]
    baseline = _rss_mb()
    started = time.monotonic()

    async def one_call() -> list[bytes | Exception]:
        if downloads is None:
            return await fetch.ImageFetcher(url, None, max_bytes=LIMIT).fetch_all(refs)
        fetcher = fetch.ImageFetcher(url, None, max_bytes=LIMIT, downloads=downloads)
        return await fetcher.fetch_all(refs, deadline=started + budget)

    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*(one_call() for _ in range(calls))), cap_s)
        ended = [type(r).__name__ for call in outcomes for r in call]
    except asyncio.TimeoutError:
        ended = ["cut off by the bench"]
    took = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    return {"time_s": took, "peak_mb": peak - baseline, "ended": sorted(set(ended))}


def _run_case(code: str, case: str, cap_s: float) -> dict:
    _, _, size, at_once, pace, _ = CASES[case]
    handler = type(
        "Host", (_Host,), {"size": size, "at_once": at_once, "pace": pace, "prefix": b"x" * at_once}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve()), "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, __file__, "--child", url, "--case", case, "--cap-s", str(cap_s)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    server.shutdown()
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", action="append", help="checkout whose service/ to run (repeatable)")
    parser.add_argument("--label", action="append", help="the column name of each --code")
    parser.add_argument("--cap-s", type=float, default=30.0, help="cut off a case after this long")
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.case[0], args.cap_s))))
        return
    codes = args.code or ["."]
    labels = args.label or [Path(c).resolve().name for c in codes]
    print("| case | code | calls x images | budget | time | peak RSS above start | downloads ended by |")
    print("|---|---|---|---|---|---|---|")
    for case in args.case or list(CASES):
        calls, per_call, *_, budget = CASES[case]
        for code, label in zip(codes, labels, strict=True):
            r = _run_case(code, case, args.cap_s)
            took = f"{r['time_s']:.1f} s" + (" (cut off)" if "cut off by the bench" in r["ended"] else "")
            print(
                f"| {case} | {label} | {calls} x {per_call} | {budget:g} s | {took} | {r['peak_mb']:.0f} MB "
                f"| {', '.join(r['ended'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
