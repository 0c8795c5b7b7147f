"""Fixtures of the FiftyOne tests: the cached FiftyOne virtualenv, a private mongod, the demo service.

FiftyOne runs in its own virtualenv (testing/fiftyone_env.py: built on first use, a few
minutes), against a ``mongod`` of this session; the service is the embedded ``serve`` with the demo
model ``exclip-scenes``, whose maps point at the generated scenes' objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing import Process, ServiceLauncher
from testing.fiftyone_env import FiftyOne, Mongo, ensure_installation

DEMO = {"EXCLIP_MODEL": "exclip-scenes", "EXCLIP_PRETRAINED": "scenes"}


@pytest.fixture(scope="session")
def fiftyone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FiftyOne]:
    venv = ensure_installation()
    root = tmp_path_factory.mktemp("fiftyone")
    (root / "db").mkdir()
    mongo = Mongo(venv, root / "db")
    try:
        yield FiftyOne(venv, mongo, root)
    finally:
        mongo.stop()


def demo_service(launcher: ServiceLauncher) -> Process:
    return launcher.embedded(**DEMO).wait_ready()


@pytest.fixture(scope="session")
def service(session_launcher: ServiceLauncher) -> Process:
    """One demo service for every FiftyOne module of a test process (nothing here stops it; the test of a
    vanishing service starts its own)."""
    return demo_service(session_launcher)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return tmp_path / "images"
