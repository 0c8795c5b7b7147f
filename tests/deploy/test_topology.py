"""The scale-out topology on real Redis: one API and three workers, started as the deployment starts them.

The commands and environment come from docker-compose.yml (the API and the CPU worker service), with
only what a test must change replaced: Redis URL, key prefix, port, the tiny model and its checkpoint
shared by all processes, and a short visibility timeout so the killed worker's jobs are reclaimed fast.
At least 60 jobs spread over the three workers; one worker is SIGKILLed while it holds unacknowledged
jobs; every job still reaches `done` exactly once for the client, with the result a direct engine call gives.

Which worker holds what when is made, not waited for: each worker has a ``WorkerHold``. All three are
held until each has started a batch (so each holds jobs), released until those are done (so each
finished jobs), then only the victim is held again, so the batch it takes next waits for the SIGKILL.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from testing import Process, WorkerHold, free_port

ROOT = Path(__file__).resolve().parents[2]
MIN_JOBS = 60  # submitted before the victim may be killed
STEPS = 10
N_WORKERS = 3
VISIBILITY_TIMEOUT_S = 3
CAPTIONS = ["a photo of a dog", "a red car parked on the street", "two cats sleeping"]

pytestmark = pytest.mark.timeout(600)


def _cli() -> list[str]:
    """`exclip-service` as installed; else the entry point pyproject.toml declares, run the same way."""
    exe = shutil.which("exclip-service", path=str(Path(sys.executable).parent))
    if exe:
        return [exe]
    module, func = re.search(
        r'^exclip-service = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M
    ).groups()
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def _with_flag(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(name) + 1] = value
    return out


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(40 + 8 * seed, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class PendingSampler(threading.Thread):
    """Polls XPENDING / XRANGE to record which consumer held which stream entry, and each entry's job."""

    def __init__(self, client, stream: str, group: str) -> None:
        super().__init__(daemon=True)
        self.client, self.stream, self.group = client, stream, group
        self.holders: dict[str, set[str]] = {}  # entry id -> consumers seen holding it
        self.job_of: dict[str, str] = {}  # entry id -> job id
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def snapshot(self) -> dict[str, str]:
        """Entry id -> consumer, right now."""
        rows = self.client.xpending_range(self.stream, self.group, min="-", max="+", count=1000)
        return {row["message_id"]: row["consumer"] for row in rows}

    def run(self) -> None:
        while not self.stopped.is_set():
            entries = self.client.xrange(self.stream)
            held = self.snapshot()
            with self.lock:
                self.job_of.update({entry_id: fields["job_id"] for entry_id, fields in entries})
                for entry_id, consumer in held.items():
                    self.holders.setdefault(entry_id, set()).add(consumer)
            time.sleep(0.003)


def test_api_and_three_workers_survive_a_sigkilled_worker(
    redis_server, key_prefix, tiny_checkpoint, tiny_loaded, tmp_path
):
    from attribution.models import TINY_MODEL
    from attribution.pipeline import ExplainRequest, explain_requests
    from service.redis_keys import GROUP, Keys

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api_service, worker_service = compose["api"], compose["worker-cpu"]
    port = free_port()
    cache = tmp_path / "cache"

    def env_of(service: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCLIP_") and k != "REDIS_URL"}
        env.update(service["environment"])
        env.update(
            {
                "REDIS_URL": redis_server.url,
                "EXCLIP_KEY_PREFIX": key_prefix,
                "EXCLIP_MODEL": TINY_MODEL,
                "EXCLIP_PRETRAINED": tiny_checkpoint,  # one self-saved file for all processes
                "EXCLIP_CACHE_DIR": str(cache / "open_clip"),
                "HF_HOME": str(cache / "huggingface"),
                "EXCLIP_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
                "EXCLIP_MAX_BATCH": "2",  # small batches spread the jobs over all three workers
                "EXCLIP_HEARTBEAT_S": "1",  # renews each held batch three times per visibility timeout
                "OMP_NUM_THREADS": "1",  # four processes share the CI machine's cores
            }
        )
        return env

    api_argv = _with_flag(_with_flag(api_service["command"], "--host", "127.0.0.1"), "--port", str(port))
    assert api_argv[0] == "serve" and worker_service["command"][0] == "worker"
    redis = redis_server.client()
    keys = Keys(key_prefix)
    stream = keys.stream(TINY_MODEL)
    worker_health = [sys.executable, *worker_service["healthcheck"]["test"][2:]]
    assert subprocess.run(worker_health, env=env_of(worker_service), capture_output=True).returncode != 0, (
        "the worker health check passes with no worker running"
    )

    worker_holds = [WorkerHold(tmp_path) for _ in range(N_WORKERS)]
    procs: list[Process] = []
    try:
        api = Process([], env_of(api_service), tmp_path, argv=[*_cli(), *api_argv], name="api")
        procs.append(api)
        workers = [
            Process(
                [],
                env_of(worker_service) | worker_holds[i].env,
                tmp_path,
                argv=[*_cli(), *worker_service["command"]],
                name=f"w{i}",
            )
            for i in range(N_WORKERS)
        ]
        procs += workers
        holds = {p.proc.pid: hold for p, hold in zip(workers, worker_holds, strict=True)}
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240  # four processes warming up on a busy machine
        while True:
            assert all(p.proc.poll() is None for p in procs), "\n".join(p.output for p in procs)
            try:
                live = redis.zrangebyscore(keys.workers, time.time(), "+inf")
                if len(live) == N_WORKERS and httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "topology not ready:\n" + "\n".join(p.output for p in procs)
            time.sleep(0.2)
        consumer_of = {p.proc.pid: n for n in live for p in workers if n.endswith(f"-{p.proc.pid}")}
        assert len(consumer_of) == N_WORKERS, f"worker names {live} do not end with the worker pids"

        # The image's and compose's health checks pass against the running processes.
        docker_health = _dockerfile_healthcheck()
        assert subprocess.run(docker_health, env={**os.environ, "EXCLIP_PORT": str(port)}).returncode == 0
        api_health = [
            sys.executable,
            *[a.replace(":8000/", f":{port}/") for a in api_service["healthcheck"]["test"][2:]],
        ]
        assert subprocess.run(api_health).returncode == 0
        assert subprocess.run(worker_health, env=env_of(worker_service)).returncode == 0

        images = [_image(seed) for seed in range(4)]
        sampler = PendingSampler(redis_server.client(), stream, GROUP)
        sampler.start()
        job_ids: list[str] = []
        combo: dict[str, tuple[int, int]] = {}
        victim = workers[0]
        victim_name = consumer_of[victim.proc.pid]

        def submit(client: httpx.Client) -> None:
            i = len(job_ids)
            body = {"image": base64.b64encode(images[i % 4]).decode(), "captions": [CAPTIONS[i % 3]]}
            response = client.post("/jobs", json=body | {"steps": STEPS})
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])
            combo[job_ids[-1]] = (i % 4, i % 3)

        def held_by(consumer: str) -> set[str]:
            return {e for e, c in sampler.snapshot().items() if c == consumer}

        def wait_done(ids: list[str], client: httpx.Client) -> dict[str, dict]:
            done: dict[str, dict] = {}
            deadline = time.monotonic() + 120
            while len(done) < len(ids):
                for job_id in set(ids) - set(done):
                    job = client.get(f"/jobs/{job_id}").json()
                    assert job["status"] in ("queued", "running", "done"), job
                    if job["status"] == "done":
                        done[job_id] = job
                assert time.monotonic() < deadline, (
                    f"{len(ids) - len(done)} jobs never finished:\n" + "\n".join(p.output for p in procs)
                )
                time.sleep(0.2)
            return done

        try:
            with httpx.Client(base_url=base, timeout=10) as client:
                # 1. Every worker held: submit until each has started a batch (and so holds jobs).
                deadline = time.monotonic() + 90
                while set(sampler.snapshot().values()) != set(consumer_of.values()):
                    assert time.monotonic() < deadline, "not every worker took a job:\n" + victim.output
                    if len(job_ids) < 4 * N_WORKERS:  # enough for every worker's batch; more wait queued
                        submit(client)
                    else:
                        time.sleep(0.05)
                # 2. All released: each finishes what it holds (and whatever else is queued).
                for hold in worker_holds:
                    hold.release()
                wait_done(job_ids, client)
                with sampler.lock:
                    finished_by_victim = {e for e, h in sampler.holders.items() if victim_name in h}
                # 3. Only the victim held again, while idle: the next batch it starts waits for the kill.
                holds[victim.proc.pid].engage()
                deadline = time.monotonic() + 90
                while len(job_ids) < MIN_JOBS or not held_by(victim_name):
                    assert time.monotonic() < deadline, "the victim never took a job:\n" + victim.output
                    if len(job_ids) < 10 * MIN_JOBS:
                        submit(client)
                    else:
                        time.sleep(0.05)
                orphaned = held_by(victim_name)  # started and held: the victim cannot ack them now
                victim.proc.kill()  # SIGKILL, no cleanup, no ack
                victim.proc.wait(10)
                for _ in range(N_WORKERS * 2):
                    submit(client)
                n_jobs = len(job_ids)

                statuses = wait_done(job_ids, client)
                # Done is final: a second read gives the same record.
                for job_id in job_ids:
                    assert client.get(f"/jobs/{job_id}").json() == statuses[job_id]
        finally:
            sampler.stopped.set()
            sampler.join(5)

        # Exactly once for the client: every id done, each with a result, nothing failed or duplicated.
        assert sorted(statuses) == sorted(job_ids) and len(set(job_ids)) == n_jobs
        assert all(j["error"] is None and len(j["result"]["captions"]) == 1 for j in statuses.values())
        assert redis.xpending(stream, GROUP)["pending"] == 0, "entries left unacknowledged"

        # Work was spread: every worker (the victim before it died) held and finished jobs.
        finishers: dict[str, set[str]] = {}
        for entry_id, holders in sampler.holders.items():
            for consumer in holders:
                finishers.setdefault(consumer, set()).add(entry_id)
        assert set(finishers) == set(consumer_of.values()), finishers.keys()
        assert finished_by_victim, "the victim finished nothing before it was killed"
        # The jobs the victim held when it died were reclaimed by a survivor and computed there.
        for entry_id in orphaned:
            job_id = sampler.job_of[entry_id]
            assert redis.hget(keys.job(job_id), "deliveries") == "2", f"{entry_id} was never reclaimed"
            assert statuses[job_id]["status"] == "done"
        survivors = [p for p in workers if p is not victim]
        assert all(p.proc.poll() is None for p in survivors + [api])

        # Results equal a direct engine call on the same checkpoint.
        options = statuses[job_ids[0]]["result"]["captions"][0]["options"]
        pairs = sorted(set(combo.values()))
        requests = [
            ExplainRequest(
                image=Image.open(io.BytesIO(images[img])).convert("RGB"),
                captions=[CAPTIONS[cap]],
                selections=[[]],
            )
            for img, cap in pairs
        ]
        explanations = explain_requests(
            tiny_loaded,
            requests,
            text_layer=options["text_layer"],
            image_layer=options["image_layer"],
            steps=options["steps"],
            precision=options["precision"],
        )
        expected = {
            pair: per_caption[0].to_dict() for pair, per_caption in zip(pairs, explanations, strict=True)
        }
        for job_id, job in statuses.items():
            got = job["result"]["captions"][0]
            want = expected[combo[job_id]]
            assert got["caption"] == want["caption"] and got["options"] == options
            np.testing.assert_allclose(
                np.array(got["interactions"]), np.array(want["interactions"]), rtol=1e-4, atol=1e-6
            )
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    finally:
        for proc in procs:
            proc.stop()


def _dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK CMD of deploy/Dockerfile, with this interpreter as `python`."""
    import json

    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    argv = json.loads(cmd)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]
