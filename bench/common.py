"""What the bench scripts share: the repository on ``sys.path``, their subprocesses, readiness waits,
client images and percentiles. Scripts import it as ``common`` (their own directory is on the path).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import REDIS_SERVER, free_port  # noqa: E402  (the harness shared with tests/)

__all__ = ["REDIS_SERVER", "ROOT", "Processes", "free_port", "images", "percentile", "service_command"]

IMAGE_SIZES = [(320, 240), (256, 256), (400, 300), (224, 320), (640, 480), (180, 180)]


def images() -> list[bytes]:
    """Distinct JPEGs: a colour gradient plus seeded noise, each of its own size."""
    out = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        rng = random.Random(i)
        noise = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
        base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        tint = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        img = Image.blend(Image.blend(base, tint, 0.5), noise, 0.3)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def service_command() -> list[str]:
    """``exclip-service`` when installed, else the same entry point through ``python -m``."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("exclip-service", path=search)
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


class Processes:
    """Every subprocess started here; ``stop_all`` ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps writing to it
        # Own session: a Ctrl-C reaches only this script, which then stops the children in order.
        proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, timeout_s: float = 30) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):  # workers and API before Redis
            self.stop(proc)

    def wait_http(self, url: str, proc: subprocess.Popen, name: str, timeout_s: float) -> None:
        """Until ``url`` answers 200; fail with the process's log tail if it exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{url} not 200 after {timeout_s:.0f}s:\n{self.log_tail(name)}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
