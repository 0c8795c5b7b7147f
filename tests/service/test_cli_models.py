"""``exclip-service models``: every architecture open_clip knows, explained (with its pretrained tags) or
refused (with the library's reason), as text and as JSON."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import open_clip
import pytest

from attribution.models import TINY_MODEL, unsupported_reason
from service import cli


def run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def listings() -> dict[str, Any]:
    """Both outputs from one survey (each reason builds timm trunks on the meta device: seconds)."""
    coverage = cli.model_coverage()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "model_coverage", lambda: coverage)
        return {"json": json.loads(run(["models", "--json"])), "text": run(["models"]).splitlines()}


def test_json_lists_each_architecture_once_with_tags_or_reason(listings: dict[str, Any]) -> None:
    explained, refused = listings["json"]["explained"], listings["json"]["refused"]
    assert set(explained) | set(refused) == set(open_clip.list_models())
    assert not set(explained) & set(refused)
    for name in ["RN50", "coca_ViT-B-32", "EVA02-B-16"]:
        assert refused[name] == unsupported_reason(open_clip.get_model_config(name))
    for name in ["ViT-B-32", "ViT-B-16-SigLIP", "ViT-H-14-worldwide"]:
        assert unsupported_reason(open_clip.get_model_config(name)) is None
        assert explained[name] == open_clip.list_pretrained_tags_by_model(name)
    assert explained["exclip-scenes"] == ["scenes"]  # the weights this package ships
    assert explained[TINY_MODEL] == []
    assert refused["RN50"] == "its image tower is a ResNet, not a ViT"


def test_text_names_the_explained_with_tags_and_the_refused_with_reasons(listings: dict[str, Any]) -> None:
    lines, listing = listings["text"], listings["json"]
    assert lines[0] == f"Explained: {len(listing['explained'])} architectures (pretrained tags in brackets)"
    assert f"Refused: {len(listing['refused'])} architectures" in lines
    assert "  RN50: its image tower is a ResNet, not a ViT" in lines
    assert "  exclip-tiny" in lines
    vit = next(line for line in lines if line.startswith("  ViT-B-32  ["))
    assert vit == f"  ViT-B-32  [{', '.join(open_clip.list_pretrained_tags_by_model('ViT-B-32'))}]"
