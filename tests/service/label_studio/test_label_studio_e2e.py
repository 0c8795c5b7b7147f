"""End to end against a real Label Studio 1.23.2: pre-annotation, interactive spans and boxes, RLE.

Label Studio runs from its own cached virtualenv (tests/service/label_studio/label_studio_server.py: built
on first use, a few minutes; then about a minute for this module). The service is the embedded
``serve`` with the tiny model and an API key, which Label Studio sends as Basic auth. Only Label
Studio's REST API is driven; it calls the backend itself. Prediction validation is on, so a result
Label Studio would reject makes the predictions missing and the tests fail
(test_label_studio_rejects_invalid_predictions shows that it is on).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import httpx
import numpy as np
import pytest

from attribution.text import Token
from service.label_studio.config import parse_label_config
from service.label_studio.results import token_regions
from service.label_studio.rle import mask_rle
from testing import ROOT
from tests.service.label_studio.label_studio_server import PASSWORD, USER, LabelStudio, venv_python
from tests.service.label_studio.scenario import CAPTION, DOCUMENTED, HEIGHT, PHRASES, WIDTH, scene_png

pytestmark = pytest.mark.slow

KEY = "ls-e2e-key"
MIN_TOKEN_SCORE = 0.3  # the backend's extra_params; the service's default is 0.5
IMAGE_ONLY = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="region" toName="image"><Label value="Phrase"/></RectangleLabels></View>'
)
SCREENSHOT = ROOT / "test-artifacts" / "screenshots" / "label-studio.png"
DOCS_SCREENSHOT = ROOT / "docs" / "label-studio.png"


@pytest.fixture(scope="module")
def service(session_launcher):
    """The embedded service, started first: it loads its model while Label Studio starts."""
    return session_launcher.embedded(EXCLIP_API_KEYS=KEY)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory, service):
    server = LabelStudio.from_template(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def backend(service, label_studio: LabelStudio) -> str:
    service.wait_ready()
    return service.url + "/label-studio"


@pytest.fixture(scope="module")
def ls(label_studio: LabelStudio):
    with label_studio.client() as client:
        yield client


@pytest.fixture(scope="module")
def project(ls, backend: str) -> dict:
    """A project with the documented config, one task (image upload + caption + phrases), the backend."""
    reply = ls.post("/api/projects", json={"title": "exclip", "label_config": IMAGE_ONLY})
    assert reply.status_code == 201, reply.text
    pid = reply.json()["id"]
    # Direct upload makes a task from a file only when the config has one data key: import the image
    # under the image-only config, then switch to the full one and give the task its caption.
    reply = ls.post(f"/api/projects/{pid}/import", files={"file": ("scene.png", scene_png(), "image/png")})
    assert reply.status_code == 201, reply.text
    reply = ls.patch(f"/api/projects/{pid}", json={"label_config": DOCUMENTED})
    assert reply.status_code == 200, reply.text
    (task,) = ls.get("/api/tasks", params={"project": pid}).json()["tasks"]
    image = task["data"]["image"]
    assert image.startswith("/data/upload/"), task
    data = {"image": image, "caption": CAPTION, "phrases": PHRASES}
    assert ls.patch(f"/api/tasks/{task['id']}", json={"data": data}).status_code == 200

    reply = ls.post(
        "/api/ml",
        json={
            "url": backend,
            "project": pid,
            "title": "exclip",
            "is_interactive": True,
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio",
            "basic_auth_pass": KEY,
            "extra_params": {"mask_level": 0.5, "min_token_score": MIN_TOKEN_SCORE},
        },
    )
    assert reply.status_code == 201, reply.text
    ml = reply.json()
    assert ml["state"] == "CO", ml  # connected: /health and /setup (with Basic auth) answered
    return {"id": pid, "task": task["id"], "ml": ml["id"], "model_version": ml["model_version"]}


def _decode_with_label_studio(rles: list[list[int]]) -> list[list[int]]:
    """Label Studio's own decoder, run in its virtualenv: flat RGBA bytes per RLE."""
    code = (
        "import json, sys\nfrom label_studio_sdk.converter.brush import decode_rle\n"
        "print(json.dumps([decode_rle(r).tolist() for r in json.load(sys.stdin)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(venv_python()), "-c", code],
        input=json.dumps(rles),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _check_image_region(region: dict) -> np.ndarray | None:
    assert region["to_name"] == "image"
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    value = region["value"]
    if region["type"] == "rectanglelabels":
        assert region["from_name"] == "region" and value["rectanglelabels"] == ["Phrase"]
        assert 0 <= value["x"] and 0 <= value["y"] and value["width"] > 0 and value["height"] > 0
        assert value["x"] + value["width"] <= 100 + 1e-6 and value["y"] + value["height"] <= 100 + 1e-6
        return None
    assert region["type"] == "brushlabels" and region["from_name"] == "heatmap"
    assert value["brushlabels"] == ["Phrase"] and value["format"] == "rle"
    return value["rle"]


@pytest.fixture(scope="module")
def prediction(ls, project: dict) -> dict:
    """The data-manager action "Retrieve predictions" on all tasks; the task's stored prediction."""
    reply = ls.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project["id"]},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert reply.status_code == 200, reply.text
    (stored,) = ls.get("/api/predictions", params={"task": project["task"]}).json()
    return stored


def test_retrieve_predictions(project: dict, prediction: dict) -> None:
    assert prediction["model_version"] == project["model_version"] == "exclip-tiny/exclip-tiny.pt"
    result = prediction["result"]
    spans = [r for r in result if r["type"] == "labels"]
    assert [r["value"]["text"] for r in spans] == PHRASES
    for region in spans:
        assert (region["from_name"], region["to_name"], region["value"]["labels"]) == (
            "phrase",
            "caption",
            ["Phrase"],
        )
        assert CAPTION[region["value"]["start"] : region["value"]["end"]] == region["value"]["text"]
    rles = [rle for rle in map(_check_image_region, [r for r in result if r["type"] != "labels"]) if rle]
    assert len(rles) >= 1, result  # the tiny model's heatmaps have a positive patch for these phrases
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    assert len(rects) == len(rles)  # one box around each mask
    for flat in _decode_with_label_studio(rles):
        rgba = np.array(flat, np.uint8).reshape(HEIGHT, WIDTH, 4)
        alpha = rgba[..., 3] > 0
        assert alpha.any() and (rgba[alpha] == 255).all()


def test_encoder_decodes_with_label_studio_decoder() -> None:
    """Masks of many shapes and densities: Label Studio's decoder gives back exactly the mask."""
    rng = np.random.default_rng(3)
    masks = [
        rng.random((h, w)) < d
        for h, w, d in [
            (1, 1, 0.5),
            (3, 70_000, 0.0001),
            (17, 5, 0.5),
            (64, 96, 0.9),
            (50, 40, 0.01),
            (8, 8, 1.0),
        ]
    ]
    decoded = _decode_with_label_studio([mask_rle(m) for m in masks])
    for mask, flat in zip(masks, decoded, strict=True):
        rgba = np.array(flat, np.uint8).reshape(*mask.shape, 4)
        assert np.array_equal(rgba[..., 3] == 255, mask)


def _interactive(ls, project: dict, region: dict) -> list[dict]:
    reply = ls.post(
        f"/api/ml/{project['ml']}/interactive-annotating",
        json={"task": project["task"], "context": {"result": [region]}},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "errors" not in body, body
    return body["data"]["result"]


def test_interactive_span(ls, project: dict) -> None:
    start = CAPTION.index("yellow")
    span = {
        "id": "sel1",
        "from_name": "phrase",
        "to_name": "caption",
        "type": "labels",
        "origin": "manual",
        "value": {"start": start, "end": start + 6, "text": "yellow", "labels": ["Phrase"]},
    }
    result = _interactive(ls, project, span)
    assert {r["type"] for r in result} == {"rectanglelabels", "brushlabels"}
    for region in result:
        _check_image_region(region)


def _explain_box(service, box: list[float]) -> tuple[list[dict], list[float]]:
    """The service's own ``POST /explain`` of the task's image and caption with a pixel box: the
    caption's tokens and their box scores, from which the interactive labels follow."""
    selection = {"box": box}
    body = {
        "image": base64.b64encode(scene_png()).decode(),
        "captions": [{"text": CAPTION, "selections": [selection]}],
    }
    reply = httpx.post(
        service.url + "/explain", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    caption = reply.json()["result"]["captions"][0]
    return caption["tokens"], caption["selections"][0]["token_scores"]


def test_interactive_rectangle(ls, project: dict, service) -> None:
    box = {
        "id": "sel2",
        "from_name": "region",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": 30, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Phrase"]},
    }
    result = _interactive(ls, project, box)
    assert result and all(r["type"] == "labels" and r["to_name"] == "caption" for r in result)
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and min(scores) >= MIN_TOKEN_SCORE
    for region in result:
        start, end = region["value"]["start"], region["value"]["end"]
        assert CAPTION[start:end] == region["value"]["text"] and start < end
    # The labels are the tokens whose box score is MIN_TOKEN_SCORE x the best or more (the threshold
    # the backend was connected with), not those the default 0.5 keeps.
    tokens, token_scores = _explain_box(service, [0.30 * WIDTH, 0.20 * HEIGHT, 0.60 * WIDTH, 0.60 * HEIGHT])
    config = parse_label_config(DOCUMENTED)
    words = [s for s, t in zip(token_scores, tokens, strict=True) if t["end"] > t["start"]]
    shares = np.asarray(words) / max(words)
    assert np.abs(shares - MIN_TOKEN_SCORE).min() > 1e-3  # none on the threshold: the count is exact

    def expected(min_score: float) -> list[str]:
        typed = [Token.from_dict(t) for t in tokens]
        return [r["value"]["text"] for r in token_regions(config, CAPTION, typed, token_scores, min_score)]

    assert len(expected(MIN_TOKEN_SCORE)) != len(expected(0.5))  # the threshold changes the outcome
    assert [r["value"]["text"] for r in result] == expected(MIN_TOKEN_SCORE)
    assert len(result) == int((shares >= MIN_TOKEN_SCORE).sum())


def test_wrong_key_is_refused(ls, project: dict, backend: str) -> None:
    reply = ls.post(
        "/api/ml",
        json={
            "url": backend,
            "project": project["id"],
            "title": "wrong key",
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio",
            "basic_auth_pass": "not-the-key",
        },
    )
    assert reply.status_code == 400 or reply.json().get("state") != "CO", reply.text


def test_labeling_page(label_studio: LabelStudio, ls, project: dict, prediction: dict, browser) -> None:
    """The labeling page highlights exactly the phrases, emoji and all (Label Studio counts offsets in
    code points); its screenshot is the README's image (docs/label-studio.png)."""
    reply = ls.patch(
        f"/api/projects/{project['id']}",
        json={"show_collab_predictions": True, "model_version": project["model_version"]},
    )
    assert reply.status_code == 200, reply.text
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    try:
        page.goto(label_studio.url + "/user/login", wait_until="domcontentloaded")
        page.fill("input[name=email]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
        page.goto(
            f"{label_studio.url}/projects/{project['id']}/data?task={project['task']}",
            wait_until="domcontentloaded",
        )
        page.get_by_text("yellow 🐕 block").first.wait_for(timeout=90_000)
        page.wait_for_timeout(3000)  # the canvas draws masks after the image loads
        highlighted = page.locator(".htx-highlight").all_text_contents()
    finally:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        page.close()
    assert sorted(highlighted) == sorted(PHRASES)
    assert SCREENSHOT.stat().st_size < 300_000
    if os.environ.get("EXCLIP_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)


def _rectangle(**change) -> dict:
    region = {
        "from_name": "region",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["Phrase"]},
    }
    return {**region, **change}


@pytest.mark.parametrize(
    "region",
    [
        _rectangle(value={"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["Dog"]}),
        _rectangle(from_name="boxes"),  # no control of that name in the config
    ],
    ids=["label-not-in-config", "from-name-not-in-config"],
)
def test_label_studio_rejects_invalid_predictions(ls, project: dict, region: dict) -> None:
    """Prediction validation (the feature flag label_studio_server.ENV sets) is on: a result that does
    not fit the label config is refused, where Label Studio without the flag stores it."""
    body = {"task": project["task"], "model_version": "validation-check", "score": 0.5}
    reply = ls.post("/api/predictions", json={**body, "result": [region]})
    assert reply.status_code == 400, reply.text
    assert "Error validating prediction" in reply.text
    # The same request with a result that fits is stored: the refusal is the validation's.
    reply = ls.post("/api/predictions", json={**body, "result": [_rectangle()]})
    assert reply.status_code == 201, reply.text
    assert ls.delete(f"/api/predictions/{reply.json()['id']}").status_code == 204
