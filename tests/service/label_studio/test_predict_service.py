"""``/label-studio/predict`` through the real queue: API and worker processes on Redis, images from a
real HTTP host standing in for Label Studio's upload server (``LABEL_STUDIO_URL``).

What Label Studio itself does with the answer is tested in test_label_studio_e2e.py; this module
checks the parts it cannot reach cheaply: Redis mode, several tasks in one call (one prediction per
task, in order, batched by the worker), a bad task among good ones, and the time budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.service.conftest import metric_values, png_bytes
from tests.service.label_studio.scenario import DOCUMENTED, file_server

pytestmark = pytest.mark.slow  # service processes start in 20-60 s on a busy 2-core machine

CAPTION = "a red square on a 🐕 blue field"


@pytest.fixture(scope="module")
def images_host(tmp_path_factory) -> Iterator[str]:
    """Four PNGs of different sizes at ``/data/upload/1/img{i}.png``."""
    root = tmp_path_factory.mktemp("ls-host")
    upload = root / "data" / "upload" / "1"
    upload.mkdir(parents=True)
    for i in range(4):
        (upload / f"img{i}.png").write_bytes(png_bytes(80 + 8 * i, 48, seed=i))
    with file_server(root) as url:
        yield url


def _task(i: int, **data) -> dict:
    return {
        "id": 100 + i,
        "project": 1,
        "data": {"image": f"/data/upload/1/img{i}.png", "caption": CAPTION, **data},
    }


def _predict(url: str, tasks: list[dict]) -> httpx.Response:
    body = {
        "tasks": tasks,
        "project": "1.1700000000",
        "label_config": DOCUMENTED,
        "params": {"context": None},
    }
    return httpx.post(url + "/label-studio/predict", json=body, timeout=120)


@pytest.fixture
def stack(launcher, images_host: str):
    """API + worker on Redis; the worker batches up to 4 jobs and waits for them to come."""
    api = launcher.api(LABEL_STUDIO_URL=images_host)
    launcher.worker(EXCLIP_MAX_BATCH="4", EXCLIP_MAX_WAIT_MS="500")
    api.wait_ready()
    return api


def test_batch_in_redis_mode(stack) -> None:
    tasks = [
        _task(0, phrases=["red square", "blue"]),
        _task(1),
        _task(2, phrases=["not in it"]),
        {"id": 200, "project": 1, "data": {"image": "http://169.254.169.254/x.png", "caption": CAPTION}},
        _task(3, phrases=[[18, 24]]),
    ]  # character offsets of "🐕 blue"
    reply = _predict(stack.url, tasks)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == len(tasks)  # Label Studio pairs them with the tasks by position
    ok, whole, missing, refused, pair = results
    assert [r["value"]["text"] for r in ok["result"] if r["type"] == "labels"] == ["red square", "blue"]
    assert [r["value"]["text"] for r in whole["result"] if r["type"] == "labels"] == [CAPTION]
    assert [r["value"]["text"] for r in pair["result"] if r["type"] == "labels"] == ["🐕 blue"]
    assert "result" not in missing and "not in the caption" in missing["error"]
    assert "result" not in refused and "not on the Label Studio host" in refused["error"]
    for prediction in (ok, whole, pair):
        assert prediction["model_version"] == "exclip-tiny/exclip-tiny.pt"
        assert isinstance(prediction["score"], float)
    # The three good tasks were enqueued together: the worker computed them in fewer engine calls.
    metrics = metric_values(httpx.get(stack.url + "/metrics", timeout=10).text)
    assert metrics["exclip_batch_size_sum"] == 3
    assert metrics["exclip_batch_size_count"] < 3


def test_time_budget_leaves_tasks_for_the_next_call(launcher, images_host: str) -> None:
    """One task per chunk and a budget spent before the first chunk is back: the call stops after it.

    The first chunk always runs (its job may not finish in the budget left); every later task is
    answered "left for the next call", and the log says how many.
    """
    api = launcher.embedded(
        LABEL_STUDIO_URL=images_host, EXCLIP_MAX_BATCH="1", EXCLIP_LABEL_STUDIO_BUDGET_S="0.001"
    )
    api.wait_ready()
    tasks = [_task(i % 4) for i in range(6)]
    started = time.monotonic()
    reply = _predict(api.url, tasks)
    assert time.monotonic() - started < 60
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 6
    first, rest = results[0], results[1:]
    assert "result" in first or first["error"] == "task 100: not finished within the time budget", first
    left = {"model_version": "exclip-tiny/exclip-tiny.pt", "error": "left for the next call (time budget)"}
    assert rest == [left] * 5
    log = api.output
    assert "label-studio: 5 of 6 task(s) left for the next call: a chunk of 1 takes" in log, log[-3000:]
