"""Serving does not depend on the evaluation package nor on its optional plotting library."""

from __future__ import annotations

import os
import subprocess
import sys

SERVING_MODULES = ("service.app", "service.worker", "service.label_studio")


def test_serving_imports_neither_evaluation_nor_matplotlib():
    probe = (
        "import importlib, sys\n"
        f"for name in {SERVING_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('attribution.evaluation', 'matplotlib'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
