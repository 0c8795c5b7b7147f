"""``exclip-service models``: every architecture open_clip knows, explained (with its pretrained tags) or
refused (with the library's reason), as text and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest

from attribution.models import TINY_MODEL, unsupported_reason
from service.cli import main
from testing import ROOT


def test_json_lists_each_architecture_once_with_tags_or_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    explained, refused = listing["explained"], listing["refused"]
    assert set(explained) | set(refused) == set(open_clip.list_models())
    assert not set(explained) & set(refused)
    for name, reason in refused.items():
        assert reason == unsupported_reason(open_clip.get_model_config(name))
    assert all(unsupported_reason(open_clip.get_model_config(name)) is None for name in explained)
    assert explained["ViT-B-32"] == open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert explained["exclip-scenes"] == ["scenes"]  # the weights this package ships
    assert explained[TINY_MODEL] == []
    assert refused["RN50"] == "its image tower is a ResNet, not a ViT"


def test_text_names_the_refused_with_their_reasons() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "models"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Explained: ") and any(line.startswith("Refused: ") for line in lines)
    assert "  RN50: its image tower is a ResNet, not a ViT" in lines
    vit = next(line for line in lines if line.startswith("  ViT-B-32  ["))
    assert "openai" in vit
