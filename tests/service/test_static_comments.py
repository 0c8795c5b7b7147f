"""The page's script names Python code it mirrors (``attribution.selections.box_patch_weights``, ...):
each such dotted name must exist, so a comment cannot send a reader to a function that is gone."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

APP_JS = Path(__file__).resolve().parents[2] / "service/web/static/app.js"
DOTTED = re.compile(r"\b((?:attribution|service)(?:\.\w+)+)")
FILES = re.compile(r"\b((?:attribution|service)/[\w/]+\.py)\b")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_python_names_in_the_page_script_exist():
    comments = "\n".join(line.split("//", 1)[1] for line in APP_JS.read_text().splitlines() if "//" in line)
    named = DOTTED.findall(comments)
    assert named, "the script names no Python code: the check would check nothing"
    assert [n for n in named if not _resolves(n.rstrip("."))] == []
    root = APP_JS.parents[3]
    assert [f for f in FILES.findall(comments) if not (root / f).is_file()] == []
