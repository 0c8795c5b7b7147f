"""The HTTP API over real HTTP, for both back-ends: results equal the engine called directly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attribution.decode import decode_image
from attribution.pipeline import ExplainRequest, decode_matrix, explain_requests
from attribution.selections import Box, Span, TokenRange
from tests.service.conftest import assert_close, b64, png_bytes, strip_timings


def direct(
    loaded,
    image: bytes,
    captions: list[str],
    selections=None,
    *,
    steps=10,
    fmt="json",
    text_layer=None,
    image_layer=None,
) -> list[dict]:
    request = ExplainRequest(decode_image(image), captions, selections or [[] for _ in captions])
    [explanations] = explain_requests(
        loaded, [request], text_layer=text_layer, image_layer=image_layer, steps=steps, precision="float32"
    )
    return [e.to_dict(matrix_format=fmt) for e in explanations]


def wait_done(client, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s")


def test_multipart_request_equals_the_engine(stack, tiny_loaded):
    image = png_bytes(64, 48, seed=1)
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": ("dog.png", image, "image/png")},
            data={"caption": "a dog on the grass", "steps": "4"},
        )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["error"] is None and job["model"] == "exclip-tiny"
    assert_close(strip_timings(job["result"]), direct(tiny_loaded, image, ["a dog on the grass"], steps=4))


def test_json_request_with_several_captions_and_selections_equals_the_engine(stack, tiny_loaded):
    image = png_bytes(80, 60, seed=2)
    body = {
        "image": b64(image),
        "steps": 3,
        "text_layer": 1,
        "image_layer": 0,
        "captions": [
            "a red ball",
            {
                "text": "two cats sleeping",
                "selections": [{"span": [4, 8]}, {"tokens": [1, 3]}, {"box": [10, 5, 50, 40]}],
            },
        ],
    }
    with stack.client() as c:
        r = c.post("/explain", json=body)
    assert r.status_code == 200, r.text
    selections = [[], [Span(4, 8), TokenRange(1, 3), Box(10, 5, 50, 40)]]
    want = direct(
        tiny_loaded,
        image,
        ["a red ball", "two cats sleeping"],
        selections,
        steps=3,
        text_layer=1,
        image_layer=0,
    )
    got = strip_timings(r.json()["result"])
    assert [s["kind"] for s in got[1]["selections"]] == ["span", "tokens", "box"]
    assert got[1]["options"] == {"text_layer": 1, "image_layer": 0, "steps": 3, "precision": "float32"}
    assert_close(got, want)


@pytest.mark.parametrize("token_field", ["tokens", "token_range"])  # the kind's name; its older spelling
def test_multipart_selections_with_caption_index(stack, tiny_loaded, token_field):
    image = png_bytes(50, 50, seed=3)
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": ("x.png", image)},
            data={
                "caption": ["a dog", "a small cat"],
                "span": ["1:2:7"],
                token_field: ["0:1:2"],
                "box": ["1:0,0,25,25"],
                "steps": "2",
            },
        )
    assert r.status_code == 200, r.text
    want = direct(
        tiny_loaded,
        image,
        ["a dog", "a small cat"],
        [[TokenRange(1, 2)], [Span(2, 7), Box(0, 0, 25, 25)]],
        steps=2,
    )
    assert_close(strip_timings(r.json()["result"]), want)


def test_base64_matrix_round_trips(stack, tiny_loaded):
    image = png_bytes(40, 40, seed=4)
    with stack.client() as c:
        r = c.post(
            "/explain", json={"image": b64(image), "captions": ["a tree"], "steps": 3, "format": "base64"}
        )
    assert r.status_code == 200, r.text
    [caption] = r.json()["result"]["captions"]
    encoded = caption["interactions"]
    assert encoded["encoding"] == "base64-float32-le" and isinstance(encoded["data"], str)
    [want] = direct(tiny_loaded, image, ["a tree"], steps=3)
    want_matrix = torch.tensor(want["interactions"])
    torch.testing.assert_close(decode_matrix(encoded), want_matrix, rtol=1e-4, atol=1e-7)
    assert list(decode_matrix(encoded).shape) == encoded["shape"] == [len(want["tokens"]), 4, 4]


def test_async_job_is_accepted_then_fetched(stack, tiny_loaded):
    image = png_bytes(30, 60, seed=5)
    with stack.client() as c:
        r = c.post("/jobs", files={"image": ("a.png", image)}, data={"caption": "a boat", "steps": "3"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["Location"] == f"/jobs/{job['id']}" and int(r.headers["Retry-After"]) >= 1
        assert job["status"] in ("queued", "running") and job["result"] is None
        done = wait_done(c, job["id"])
    assert done["status"] == "done"
    assert_close(strip_timings(done["result"]), direct(tiny_loaded, image, ["a boat"], steps=3))


def test_explain_answers_202_when_the_result_is_not_ready_in_time(stack):
    with stack.client() as c:
        r = c.post(
            "/explain",
            files={"image": ("a.png", png_bytes(seed=6))},
            data={"caption": "a house", "steps": "3", "wait": "0"},
        )
        assert r.status_code == 202 and r.headers["Location"] == f"/jobs/{r.json()['id']}"
        assert wait_done(c, r.json()["id"])["status"] == "done"


def test_cancelled_job_is_not_computed(stack):
    """A job cancelled while the worker computes another is skipped when the worker reads it.

    The busy job is held running (``stack.hold``) until the victim is cancelled; a job submitted after
    the victim finishing proves the worker has read past the victim's entry (one worker, read in order).
    """
    with stack.client() as c:
        stack.hold.engage()
        try:
            busy = c.post("/jobs", files={"image": ("a.png", png_bytes(seed=7))}, data={"caption": "a dog"})
            busy = busy.json()
            deadline = time.monotonic() + 60
            while (status := c.get(f"/jobs/{busy['id']}").json()["status"]) != "running":
                assert status == "queued" and time.monotonic() < deadline, f"the busy job is {status}"
                time.sleep(0.02)
            victim = c.post(
                "/jobs",
                files={"image": ("b.png", png_bytes(seed=8))},
                data={"caption": "a cat", "steps": "3"},
            ).json()
            r = c.delete(f"/jobs/{victim['id']}")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "cancelled"
            assert c.get(f"/jobs/{busy['id']}").json()["status"] == "running"  # cancelled while it was busy
            later = c.post(
                "/jobs",
                files={"image": ("c.png", png_bytes(seed=9))},
                data={"caption": "a bird", "steps": "3"},
            ).json()
        finally:
            stack.hold.release()
        assert wait_done(c, busy["id"])["status"] == "done"
        assert wait_done(c, later["id"])["status"] == "done"  # so the victim's entry was read before
        after = c.get(f"/jobs/{victim['id']}").json()
        assert after["status"] == "cancelled" and after["result"] is None
        assert c.delete(f"/jobs/{busy['id']}").status_code == 409  # finished jobs cannot be cancelled


def test_unknown_job_id_is_404(stack):
    with stack.client() as c:
        for r in (c.get("/jobs/0123456789abcdef"), c.delete("/jobs/0123456789abcdef")):
            assert r.status_code == 404 and "no job" in r.json()["detail"]


def test_models_lists_the_workers_model_with_option_ranges(stack):
    with stack.client() as c:
        body = c.get("/models").json()
    [model] = body["models"]
    assert body["default"] == "exclip-tiny"
    assert (model["name"], model["grid"], model["image_size"], model["context_length"]) == (
        "exclip-tiny",
        [4, 4],
        [32, 32],
        77,
    )
    assert model["options"]["text_layer"] == {"min": 0, "max": 2, "default": 2}
    assert model["options"]["steps"]["max"] == 100
    assert model["options"]["caption_chars"]["max"] == 1000  # EXCLIP_MAX_CAPTION_CHARS
    assert model["options"]["precision"] == ["float32", "bfloat16", "float16"]


def test_health_ready_and_docs(stack):
    with stack.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"] == ["exclip-tiny"]
        schema = c.get("/openapi.json").json()
        assert {"/explain", "/jobs", "/jobs/{job_id}", "/models", "/metrics"} <= set(schema["paths"])
        content = schema["paths"]["/explain"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        assert c.get("/docs").status_code == 200


def test_concurrent_requests_are_batched_and_all_correct(stack, tiny_loaded):
    images = [png_bytes(40 + 8 * i, 40, seed=20 + i) for i in range(4)]
    captions = ["a dog", "a red car on a road", "two birds", "a bowl of fruit"]
    want = {
        (i, j): direct(tiny_loaded, images[i], [captions[j]], steps=3) for i in range(4) for j in range(4)
    }
    before = stack.metrics()

    def call(n: int):
        i, j = n % 4, (n // 4) % 4
        with stack.client() as c:
            return (i, j), c.post(
                "/explain", files={"image": ("x.png", images[i])}, data={"caption": captions[j], "steps": "3"}
            )

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(call, range(32)))
    for key, r in replies:
        assert r.status_code == 200, r.text
        assert_close(strip_timings(r.json()["result"]), want[key])
    after = stack.metrics()
    batches = after["exclip_batch_size_count"] - before["exclip_batch_size_count"]
    singles = after['exclip_batch_size_bucket{le="1"}'] - before['exclip_batch_size_bucket{le="1"}']
    jobs = after["exclip_batch_size_sum"] - before["exclip_batch_size_sum"]
    assert jobs == 32 and batches < 32 and singles < batches  # some batches held more than one job
    assert after['exclip_batch_size_bucket{le="8"}'] - before['exclip_batch_size_bucket{le="8"}'] == batches
    assert after['exclip_jobs_total{outcome="done"}'] - before['exclip_jobs_total{outcome="done"}'] == 32


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics_are_prometheus_text(stack, path):
    with stack.client() as c:
        r = c.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = stack.metrics()
    assert values["exclip_workers"] >= 1 and "exclip_queue_wait_seconds_count" in values
    assert 'exclip_compute_seconds_bucket{le="+Inf"}' in values
