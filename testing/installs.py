"""Tools the tests install once per machine and cache (Label Studio, FiftyOne): a lock so that parallel
test runs build a cache one at a time, and a logged subprocess whose failure shows its log's tail."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One builder at a time (parallel test runs on one machine share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_logged(args: list[str], log: Path, timeout_s: float) -> None:
    """Run ``args`` with its output appended to ``log``; raise with the log's tail if it fails."""
    with open(log, "ab") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(args[:4])} ... failed with {done.returncode}; log {log}:\n{tail}")
