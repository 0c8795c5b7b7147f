"""The service end to end with every model family the engine explains (tiny random-weight models of
``testing.families``, tokenizers built offline): ``/explain`` with a span and a box, the extra rows and
columns of each tower in the result, the heatmap PNG, ``/models`` and a Label Studio ``/predict``.

The engine's exactness per family is tested in tests/attribution; here the service must carry each
family's result shape through unchanged (caption tokens of Hugging Face tokenizers, no class token,
padding rows) and add up to the completeness total it reports.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from attribution.models import load_model
from testing.families import family_arch, register_families
from tests.service.conftest import embedded_in_process, png_bytes
from tests.service.label_studio.scenario import DOCUMENTED, SCENE_PATH, scene_png

CAPTION = "a red car"
RED = (2, 5)  # the span of "red"
# Per family: the extra image columns and extra text rows its towers report.
EXTRAS = {
    "siglip": (set(), {"padding"}),
    "siglip2": (set(), {"padding"}),
    "clipa": ({"cls"}, {"padding"}),  # its class token is a row, though the mean pools the patches
    "metaclip2": ({"cls"}, set()),
    "timm-cls": ({"cls", "registers"}, set()),
}


@pytest.fixture(scope="module", params=sorted(EXTRAS))
def family(request: pytest.FixtureRequest, image_host: str) -> Iterator[tuple[str, TestClient]]:
    register_families()
    arch = family_arch(request.param)
    loaded = load_model(arch, None)
    settings = {"model": arch, "pretrained": "none", "device": "cpu", "label_studio_url": image_host}
    with embedded_in_process(loaded, **settings) as client:
        yield request.param, client


def _explain(client: TestClient, **data: str) -> dict[str, Any]:
    files = {"image": ("scene.png", png_bytes(64, 48, seed=5), "image/png")}
    reply = client.post(
        "/explain", files=files, data={"caption": CAPTION, "steps": "2", "wait": "60", **data}
    )
    assert reply.status_code == 200 and reply.json()["status"] == "done", reply.text
    [caption] = reply.json()["result"]["captions"]
    return caption


def test_explain_reports_the_towers_extra_rows_and_columns_and_adds_up(family):
    name, client = family
    columns, rows = EXTRAS[name]
    result = _explain(client, span=f"{RED[0]}:{RED[1]}", box="0,0,32,24")
    n_tokens, grid = len(result["tokens"]), result["grid"]
    assert len(result["interactions"]) == n_tokens
    assert set(result["extra_columns"]) == columns and set(result["extra_rows"]) == rows
    assert (result["cls"] is None) == ("cls" not in columns)
    for column in result["extra_columns"].values():
        assert len(column) == n_tokens
    for row in result["extra_rows"].values():
        assert [len(row), len(row[0])] == [grid["rows"], grid["cols"]]
    total = sum(v for t in result["interactions"] for r in t for v in r)
    total += sum(sum(c) for c in result["extra_columns"].values())
    total += sum(v for m in result["extra_rows"].values() for r in m for v in r) + result["corner"]
    assert total == pytest.approx(result["completeness"]["total"], rel=1e-4, abs=1e-6)
    span, box = result["selections"]
    red = [t["index"] for t in result["tokens"] if t["start"] < RED[1] and t["end"] > RED[0]]
    assert span["tokens"] == red and red, result["tokens"]
    assert len(box["token_scores"]) == n_tokens


def test_the_heatmap_png_renders_for_a_span_and_a_box(family):
    _, client = family
    reply = client.post(
        "/explain",
        files={"image": ("scene.png", png_bytes(64, 48, seed=5), "image/png")},
        data={"caption": CAPTION, "steps": "1", "wait": "60"},
    )
    job = reply.json()["id"]
    for query in (f"span={RED[0]}:{RED[1]}", "box=0,0,32,24&legend=true", ""):
        png = client.get(f"/jobs/{job}/heatmap.png?{query}")
        assert png.status_code == 200, (query, png.text)
        assert Image.open(io.BytesIO(png.content)).size[0] > 0


def test_models_lists_the_served_family_with_what_it_reports_beside_the_matrix(family):
    name, client = family
    [model] = client.get("/models").json()["models"]
    columns, rows = EXTRAS[name]
    assert model["name"] == family_arch(name)
    assert set(model["extra_columns"]) == columns and set(model["extra_rows"]) == rows


def test_label_studio_predict_answers_a_phrase(family):
    """The phrase's label on the caption always; its box and brush mask where its heatmap (the same
    computation through /explain) has a positive patch: random weights may give none."""
    _, client = family
    phrase = "red car"
    task = {"id": 1, "project": 1, "data": {"image": SCENE_PATH, "caption": CAPTION, "phrases": [phrase]}}
    body = {"tasks": [task], "label_config": DOCUMENTED, "params": {"context": None}}
    reply = client.post("/label-studio/predict", json=body)
    assert reply.status_code == 200, reply.text
    [prediction] = reply.json()["results"]
    kinds = [r["type"] for r in prediction["result"]]
    assert kinds.count("labels") == 1, prediction
    start = CAPTION.index(phrase)
    files = {"image": ("scene.png", scene_png(), "image/png")}
    data = {"caption": CAPTION, "span": f"{start}:{start + len(phrase)}", "wait": "60"}
    explained = client.post("/explain", files=files, data=data).json()["result"]["captions"][0]
    positive = max(v for row in explained["selections"][0]["heatmap"] for v in row) > 0
    assert ("rectanglelabels" in kinds) == positive and ("brushlabels" in kinds) == positive, prediction
