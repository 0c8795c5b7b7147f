"""``/label-studio/setup`` in process: a project's ``extra_params`` are the thresholds its predictions use,
and thresholds or a label config the backend cannot use are refused when Label Studio connects.

The predictions come from the app's own worker (the tiny model, in this process) and are compared
with the same computation through ``POST /explain``: each threshold must give exactly the regions
that its value implies from those heatmaps and token scores, which the defaults would not give.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from attribution.geometry import ImageGeometry
from attribution.text import Token
from service.app import create_app
from service.label_studio import results
from service.label_studio.config import parse_label_config
from service.settings import Settings
from tests.service.conftest import embedded_in_process
from tests.service.label_studio.scenario import (
    CAPTION,
    DOCUMENTED,
    HEIGHT,
    PHRASES,
    SCENE_PATH,
    WIDTH,
    scene_png,
)

CONFIG = parse_label_config(DOCUMENTED)
IMAGE = SCENE_PATH
BOX_PCT = {"x": 50, "y": 0, "width": 50, "height": 100}  # the image's right half
BOX_PX = [WIDTH / 2, 0, WIDTH, HEIGHT]
DEFAULT = {"mask_level": 0.5, "min_token_score": 0.5}  # the settings' defaults


@pytest.fixture(scope="module")
def client(tiny_checkpoint: str, tiny_loaded, image_host: str) -> Iterator[TestClient]:
    """The app in embedded mode: its worker computes with the tiny model in this process."""
    with embedded_in_process(
        tiny_loaded,
        model="exclip-tiny",
        pretrained=tiny_checkpoint,
        device="cpu",
        label_studio_url=image_host,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def bare_client() -> Iterator[TestClient]:
    """No worker: /setup needs none."""
    with TestClient(create_app(Settings())) as client:
        yield client


def _explain(client: TestClient, selections: list[dict]) -> dict:
    body = {
        "image": base64.b64encode(scene_png()).decode(),
        "captions": [{"text": CAPTION, "selections": selections}],
    }
    reply = client.post("/explain", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["result"]["captions"][0]


def _spans() -> list[list[int]]:
    return [[CAPTION.index(p), CAPTION.index(p) + len(p)] for p in PHRASES]


def _setup(client: TestClient, project: str, extra_params) -> None:
    body = {
        "project": project,
        "schema": DOCUMENTED,
        "hostname": "",
        "access_token": "",
        "extra_params": extra_params,
    }
    reply = client.post("/label-studio/setup", json=body)
    assert reply.status_code == 200, reply.text


def _predict(client: TestClient, project: str | None, task_project: int, context: dict | None) -> list[dict]:
    task = {
        "id": 1,
        "project": task_project,
        "data": {"image": IMAGE, "caption": CAPTION, "phrases": PHRASES},
    }
    body = {"tasks": [task], "label_config": DOCUMENTED, "params": {"context": context}}
    if project is not None:
        body["project"] = project
    reply = client.post("/label-studio/predict", json=body)
    assert reply.status_code == 200, reply.text
    (prediction,) = reply.json()["results"]
    assert "result" in prediction, prediction
    return prediction["result"]


def _masks(heatmaps: list[np.ndarray], image: dict, level: float) -> list[list[int]]:
    """The brush RLEs a batch prediction holds at this mask_level (one per phrase with a mask)."""
    masks = [
        results.heatmap_mask(
            h, ImageGeometry.from_dict({**image, "grid": {"rows": h.shape[0], "cols": h.shape[1]}}), level
        )
        for h in heatmaps
    ]
    return [m.rle() for m in masks if m.any()]


def _labels(tokens: list[dict], scores: list[float], min_score: float) -> list[tuple[str, float]]:
    """The caption labels (text, share of the best) an interactive box gets at this min_token_score."""
    regions = results.token_regions(CONFIG, CAPTION, [Token.from_dict(t) for t in tokens], scores, min_score)
    return [(r["value"]["text"], r["score"]) for r in regions]


def test_extra_params_are_the_thresholds_of_their_project(client: TestClient) -> None:
    batch = _explain(client, [{"span": span} for span in _spans()])
    image, heatmaps = batch["image"], [np.asarray(s["heatmap"]) for s in batch["selections"]]
    boxed = _explain(client, [{"box": BOX_PX}])
    tokens, scores = boxed["tokens"], boxed["selections"][0]["token_scores"]
    ratios = np.concatenate([(h / h.max()).ravel() for h in heatmaps])
    words = [s for s, t in zip(scores, tokens, strict=True) if t["end"] > t["start"]]
    shares = np.asarray(words) / max(words)

    # Project 21: both thresholds, as an object; project 22: min_token_score alone, as the JSON text
    # the backend form stores; project 23: no /setup (an interactive call on a replica that missed it).
    projects = {
        "21.1700000000": {"mask_level": 0.85, "min_token_score": 0.05, "other_backend_key": 3},
        "22.1700000000": json.dumps({"min_token_score": 0.3}),
    }
    for project, extra_params in projects.items():
        _setup(client, project, extra_params)
    expected = {
        "21.1700000000": {"mask_level": 0.85, "min_token_score": 0.05},
        "22.1700000000": {"mask_level": 0.5, "min_token_score": 0.3},
        "23.1700000000": DEFAULT,
    }
    for thresholds in expected.values():  # no patch or token sits on a threshold: the outcome is exact
        assert np.abs(ratios - thresholds["mask_level"]).min() > 1e-3
        assert np.abs(shares - thresholds["min_token_score"]).min() > 1e-3
    # Each project's thresholds imply other regions than the defaults do, so using them is visible.
    assert _masks(heatmaps, image, 0.85) != _masks(heatmaps, image, DEFAULT["mask_level"])
    for min_score in (0.05, 0.3):
        assert len(_labels(tokens, scores, min_score)) > len(
            _labels(tokens, scores, DEFAULT["min_token_score"])
        )

    for project, thresholds in expected.items():
        pid = int(project.split(".")[0])
        # Label Studio names the project "<id>.<timestamp>" in a batch call; the task names its id.
        batch_regions = _predict(client, project, pid, None)
        brushes = [r["value"]["rle"] for r in batch_regions if r["type"] == "brushlabels"]
        assert brushes == _masks(heatmaps, image, thresholds["mask_level"]), project
        context = {
            "result": [
                {"from_name": "region", "to_name": "image", "type": "rectanglelabels", "value": BOX_PCT}
            ]
        }
        labels = [(r["value"]["text"], r["score"]) for r in _predict(client, None, pid, context)]
        want = _labels(tokens, scores, thresholds["min_token_score"])
        assert [text for text, _ in labels] == [text for text, _ in want], project
        assert [share for _, share in labels] == pytest.approx([share for _, share in want], abs=1e-4)


@pytest.mark.parametrize(
    "extra_params",
    [
        {"mask_level": 0},  # a mask needs a level above zero
        {"mask_level": 1.5},
        {"min_token_score": -0.1},
        {"min_token_score": "high"},
        json.dumps({"min_token_score": 2}),  # the form's JSON text is checked the same way
    ],
)
def test_setup_refuses_thresholds_out_of_range(bare_client: TestClient, extra_params) -> None:
    body = {"project": "31.1700000000", "schema": DOCUMENTED, "extra_params": extra_params}
    reply = bare_client.post("/label-studio/setup", json=body)
    assert reply.status_code == 422, reply.text
    assert "extra_params" in reply.json()["detail"]


@pytest.mark.parametrize(
    "schema",
    [
        '<View><Image name="image" value="$image"/></View>',  # no Text for the caption
        "<View><Image",  # not XML
    ],
)
def test_setup_refuses_a_label_config_without_what_the_backend_needs(
    bare_client: TestClient, schema: str
) -> None:
    reply = bare_client.post("/label-studio/setup", json={"project": "32.1700000000", "schema": schema})
    assert reply.status_code == 422, reply.text
    assert (
        bare_client.post(
            "/label-studio/setup", json={"project": "32.1700000000", "schema": DOCUMENTED}
        ).status_code
        == 200
    )
