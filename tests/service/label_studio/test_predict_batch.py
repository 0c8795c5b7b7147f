"""A ``/predict`` batch in process: each task's limits are checked before any work on it, and that work
runs off the event loop; a task that breaks a limit, or whose image URL cannot even be sent, gets its
own error entry while the others are predicted; the log does not grow with the number of tasks.

The predictions come from the app's own worker (the tiny model, in this process); the images from a
real HTTP server standing in for Label Studio's upload server (``image_host``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.label_studio import tasks as tasks_module
from service.label_studio.protocol import MAX_TASKS
from tests.service.conftest import embedded_in_process
from tests.service.label_studio.scenario import CAPTION, DOCUMENTED, PHRASES, SCENE_PATH

LIMIT = 64  # EXCLIP_MAX_SELECTIONS's default


def _app(tiny_checkpoint: str, tiny_loaded, image_host: str, **settings):
    """The app in embedded mode, its worker computing with the tiny model in this process, ready."""
    config = {
        "model": "exclip-tiny",
        "pretrained": tiny_checkpoint,
        "device": "cpu",
        "label_studio_url": image_host,
    }
    return embedded_in_process(tiny_loaded, **config, **settings)


@pytest.fixture(scope="module")
def client(tiny_checkpoint: str, tiny_loaded, image_host: str) -> Iterator[TestClient]:
    with _app(tiny_checkpoint, tiny_loaded, image_host) as client:
        yield client


@pytest.fixture
def searches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Every phrase search as (phrase, caption, whether it ran on a thread with a running event loop)."""
    calls: list[tuple[str, str, bool]] = []
    find = tasks_module.find

    def recorded(phrase: str, caption: str):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((phrase, caption, on_loop))
        return find(phrase, caption)

    monkeypatch.setattr(tasks_module, "find", recorded)
    return calls


def _task(i: int, image: str = SCENE_PATH, **data) -> dict:
    return {"id": i, "project": 1, "data": {"image": image, "caption": CAPTION, **data}}


def _predict(client: TestClient, tasks: list[dict]) -> list[dict]:
    body = {"tasks": tasks, "label_config": DOCUMENTED, "params": {"context": None}}
    reply = client.post("/label-studio/predict", json=body)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == len(tasks)  # Label Studio pairs them with the tasks by position
    return results


def _labels(prediction: dict) -> list[str]:
    return [r["value"]["text"] for r in prediction["result"] if r["type"] == "labels"]


def test_limits_come_before_the_phrase_search_which_runs_off_the_loop(
    client: TestClient, searches: list, caplog: pytest.LogCaptureFixture
) -> None:
    """A caption over EXCLIP_MAX_CAPTION_CHARS is refused unsearched; of a task's phrases only the first
    EXCLIP_MAX_SELECTIONS are searched; the other tasks are predicted; one warning names each problem."""
    caplog.set_level(logging.INFO, logger="exclip.label_studio")
    long_caption = "x" * 1000 + " dog"
    many = [PHRASES[0]] * (LIMIT - 1) + [PHRASES[1]] + ["not in the caption"] * 1000
    tasks = [
        {"id": 1, "data": {"image": SCENE_PATH, "caption": long_caption, "phrases": ["dog"] * 10}},
        _task(2, phrases=many),
        _task(3, phrases=PHRASES),
    ]
    too_long, capped, plain = _predict(client, tasks)
    assert "result" not in too_long
    assert too_long["error"] == (
        "task 1: data.caption has 1004 characters; the limit is 1000 (EXCLIP_MAX_CAPTION_CHARS): "
        "shorten the caption"
    )
    assert _labels(capped) == PHRASES  # the 64 first phrases: one span twice is explained once
    assert _labels(plain) == PHRASES
    assert [p for p, c, _ in searches] == many[:LIMIT] + PHRASES
    assert {c for _, c, _ in searches} == {CAPTION}
    assert not any(on_loop for *_, on_loop in searches)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "label-studio: no prediction for 1 task(s), e.g. " + too_long["error"],  # it names the task
        "label-studio: 1 task(s) have more than 64 phrases, e.g. task 2; only the first 64 of each are "
        "explained (EXCLIP_MAX_SELECTIONS)",
    ]


def test_many_bad_tasks_one_warning(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """MAX_TASKS tasks without a caption: an error entry each, and one warning naming three of them."""
    caplog.set_level(logging.INFO, logger="exclip.label_studio")
    results = _predict(client, [{"id": i, "data": {"image": SCENE_PATH}} for i in range(MAX_TASKS)])
    assert all("caption" in r["error"] for r in results)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings[:5]
    assert warnings[0].startswith(f"label-studio: no prediction for {MAX_TASKS} task(s), e.g. task 0: ")
    assert warnings[0].count("must be the caption") == 3
    missing_image = _predict(client, [_task(7, image="/data/upload/1/missing.png")])[0]["error"]
    assert missing_image.startswith("image '/data/upload/1/missing.png': ")
    assert (
        caplog.records[-1].getMessage()
        == "label-studio: no prediction for 1 task(s), e.g. task 7: " + missing_image
    )


def test_more_tasks_than_the_limit_are_refused(client: TestClient, searches: list) -> None:
    body = {"tasks": [_task(i) for i in range(MAX_TASKS + 1)], "label_config": DOCUMENTED}
    reply = client.post("/label-studio/predict", json=body)
    assert reply.status_code == 422
    assert f"at most {MAX_TASKS} items" in reply.text
    assert searches == []


def test_an_image_url_httpx_cannot_send_fails_only_its_task(client: TestClient, image_host: str) -> None:
    """URLs httpx refuses to build a request from (too long, control characters, a broken IPv6 host)
    are that task's error; the good tasks around them are predicted."""
    bad = [
        "/" + "a" * 70_000,
        "/data/\u0000.png",
        f"{image_host}/data/\r\nX-Injected: 1",
        "http://[::1/x.png",
    ]
    tasks = [_task(0), *(_task(i + 1, image=ref) for i, ref in enumerate(bad)), _task(9)]
    first, *refused, last = _predict(client, tasks)
    assert _labels(first) == _labels(last) == [CAPTION]
    for prediction in refused:
        assert "result" not in prediction and "is not a valid URL" in prediction["error"], prediction


def test_tasks_left_for_the_next_call_are_not_read(
    tiny_checkpoint: str, tiny_loaded, image_host: str, searches: list
) -> None:
    """With the budget spent after the first chunk (one task), no other task's phrases are searched."""
    with _app(tiny_checkpoint, tiny_loaded, image_host, max_batch=1, label_studio_budget_s=0.001) as client:
        results = _predict(client, [_task(i, phrases=[PHRASES[i % 2]]) for i in range(4)])
    assert [r["error"] for r in results[1:]] == ["left for the next call (time budget)"] * 3
    assert [p for p, *_ in searches] == [PHRASES[0]]


def test_a_call_answers_no_more_than_its_byte_limit(
    tiny_checkpoint: str, tiny_loaded, image_host: str
) -> None:
    # One task per chunk and a limit of one byte: the first prediction fills the answer.
    settings = {"max_batch": 1, "label_studio_max_answer_bytes": 1}
    with _app(tiny_checkpoint, tiny_loaded, image_host, **settings) as client:
        results = _predict(client, [_task(i, phrases=PHRASES) for i in range(3)])
    assert "result" in results[0]
    assert [r.get("error") for r in results[1:]] == ["left for the next call (answer size)"] * 2
