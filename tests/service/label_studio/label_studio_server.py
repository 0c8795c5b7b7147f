"""A real Label Studio 1.23.2 for the tests: its own cached virtualenv, a migrated data dir, a process.

``pip install label-studio==1.23.2`` pins Django and much else, so it never goes into the service's
environment: ``ensure_installation()`` builds a virtualenv and a migrated, user-holding template data
dir once under ``${XDG_CACHE_HOME:-~/.cache}/exclip-tests/label-studio-1.23.2/`` (a few minutes: the
install, then a 60-75 s first start that migrates SQLite). Later runs copy the template (a restart
on it takes 5-9 s). A build that fails raises: the tests that need Label Studio fail, never skip.

``LabelStudio`` runs ``label-studio start`` on a free port with the settings that keep it off the
network and let it reach a backend on 127.0.0.1, and with prediction validation turned on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from testing import free_port
from testing.installs import locked, run_logged

VERSION = "1.23.2"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "exclip-tests"
    / f"label-studio-{VERSION}"
)
USER = "admin@example.com"  # Label Studio wants a real-looking domain
PASSWORD = "exclip-test-password"
TOKEN = "e" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits, a legacy API token

ENV = {
    "ML_BLOCK_LOCAL_IP": "false",  # the backend under test listens on 127.0.0.1
    "SSRF_PROTECTION_ENABLED": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",  # stay off the network
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "fflag_feat_utc_210_prediction_validation_15082025": "true",  # a prediction LS would reject fails
    "PYTHONUNBUFFERED": "1",
}


def venv_python() -> Path:
    return CACHE / "venv" / "bin" / "python"


def ensure_installation() -> tuple[Path, Path]:
    """(virtualenv, template data dir), building them first if the cache lacks them."""
    venv, template = CACHE / "venv", CACHE / "template"
    with locked(CACHE.parent / f"label-studio-{VERSION}.lock"):
        CACHE.mkdir(parents=True, exist_ok=True)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            log = CACHE / "install.log"
            run_logged([sys.executable, "-m", "venv", str(venv)], log, 120)
            # Few retries: without a package index this fails in about a minute instead of many.
            run_logged(
                [
                    str(venv / "bin" / "pip"),
                    "install",
                    "--disable-pip-version-check",
                    "-q",
                    "--retries",
                    "2",
                    "--timeout",
                    "20",
                    f"label-studio=={VERSION}",
                ],
                log,
                900,
            )
            (venv / ".complete").touch()
        if not (template / ".complete").exists():
            shutil.rmtree(template, ignore_errors=True)
            template.mkdir(parents=True)
            server = LabelStudio(venv, template, CACHE / "template-home", first_start=True)
            try:
                server.start(timeout_s=600)
            finally:
                server.stop()
            (template / ".complete").touch()
    return venv, template


class LabelStudio:
    """``label-studio start`` on a free port with a data dir of its own; ``url``, ``token``, ``log``."""

    def __init__(
        self, venv: Path, data_dir: Path, home: Path, *, first_start: bool = False, port: int | None = None
    ) -> None:
        self.venv, self.data_dir, self.home = venv, data_dir, home
        self.port = port or free_port()
        self.url, self.token = f"http://127.0.0.1:{self.port}", TOKEN
        self.first_start = first_start
        self.log = data_dir.parent / f"label-studio-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def from_template(cls, tmp: Path) -> LabelStudio:
        venv, template = ensure_installation()
        data_dir = tmp / "label-studio-data"
        shutil.copytree(template, data_dir)
        return cls(venv, data_dir, tmp / "home")

    def start(self, timeout_s: float = 180) -> LabelStudio:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ENV, "HOME": str(self.home), "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir)}
        env.pop("PYTHONPATH", None)
        args = [
            str(self.venv / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--user-token",
            TOKEN,
            "--enable-legacy-api-token",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, env=env, cwd=self.data_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/version", headers=self.headers, timeout=5).status_code == 200:
                    return self
            time.sleep(0.5)
        raise RuntimeError(f"label-studio did not answer within {timeout_s} s:\n{self.output[-3000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def stop(self) -> None:
        """SIGTERM to the process group this object started (label-studio and its server), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
