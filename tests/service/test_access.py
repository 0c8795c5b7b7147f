"""Access control over real HTTP: API keys on every endpoint, per-key job ownership, no key in any log
or Redis value, and CORS off unless configured.

The stack is API + worker subprocesses on the private Redis with ``EXCLIP_API_KEYS`` set; the route
list comes from the app's own OpenAPI schema, so a new unprotected endpoint makes the test fail.
"""

from __future__ import annotations

import re
import signal
import uuid

import httpx
import pytest

from testing import ServiceLauncher
from tests.service.conftest import png_bytes

KEY_A, KEY_B = "alpha-key-6d1f0c2b9e", "beta-key-41aa77e3c5"
WRONG = "wrong-key-0b5e2d9a77"
# The page itself asks for the key; docs are static; Label Studio checks its backend within 1 s.
PUBLIC = {"/healthz", "/readyz", "/", "/label-studio/health"}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(redis_server, tiny_checkpoint, tmp_path_factory):
    """API (keys: A from the env, B from a file) + worker on their own key prefix.

    Yields (url, api process, worker process, key prefix).
    """
    tmp = tmp_path_factory.mktemp("access")
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# one key per line\n{KEY_B}\n")
    launch = ServiceLauncher(redis_server.url, f"acc{uuid.uuid4().hex[:10]}", tiny_checkpoint, tmp)
    try:
        api = launch.api(EXCLIP_API_KEYS=KEY_A, EXCLIP_API_KEYS_FILE=str(keys_file))
        worker = launch.worker()
        api.wait_ready()  # /readyz is public, so the shared helper works with keys on
        yield api.url, api, worker, launch.key_prefix
    finally:
        launch.close()


def concrete(path: str, job_id: str) -> str:
    return re.sub(r"\{[^}]+\}", job_id, path)


def test_every_endpoint_but_health_and_page_needs_a_key(keyed):
    url, _, _, _ = keyed
    schema = httpx.get(url + "/openapi.json", timeout=10).json()
    with httpx.Client(base_url=url, timeout=30) as c:
        job_id = c.post(
            "/jobs",
            headers=bearer(KEY_A),
            files={"image": ("x.png", png_bytes())},
            data={"caption": "a dog", "steps": "1"},
        ).json()["id"]
        checked = []
        for path, methods in schema["paths"].items():
            for method in methods:
                target = concrete(path, job_id)
                bad_headers = (
                    {},
                    bearer(WRONG),
                    {"Authorization": KEY_A},
                    {"Authorization": "Basic " + KEY_A},
                )
                for headers in bad_headers:
                    r = c.request(method.upper(), target, headers=headers)
                    if path in PUBLIC:
                        assert r.status_code == 200, (method, path, r.text)
                        continue
                    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                    # Label Studio can only send Basic auth: its routes take the key as the password too
                    schemes = ("Bearer", "Basic") if path.startswith("/label-studio/") else ("Bearer",)
                    assert r.headers["www-authenticate"] in schemes
                    assert "API key" in r.json()["detail"]
                checked.append((method, path))
        static = c.get("/static/app.js")
    assert static.status_code == 200
    assert {
        ("post", "/explain"),
        ("post", "/jobs"),
        ("get", "/jobs/{job_id}"),
        ("delete", "/jobs/{job_id}"),
        ("get", "/jobs/{job_id}/heatmap.png"),
        ("get", "/models"),
        ("get", "/metrics"),
    } <= set(checked)


def test_both_key_sources_work_and_jobs_belong_to_their_key(keyed):
    url, _, _, _ = keyed
    with httpx.Client(base_url=url, timeout=60) as c:
        for key in (KEY_A, KEY_B):
            assert c.get("/models", headers=bearer(key)).status_code == 200
        done = c.post(
            "/explain",
            headers=bearer(KEY_A),
            files={"image": ("x.png", png_bytes())},
            data={"caption": "a dog", "steps": "1", "span": "2:5"},
        )
        assert done.status_code == 200 and done.json()["status"] == "done", done.text
        job_id = done.json()["id"]
        owner_reads = {
            "get": c.get(f"/jobs/{job_id}", headers=bearer(KEY_A)),
            "heatmap": c.get(f"/jobs/{job_id}/heatmap.png", params={"span": "2:5"}, headers=bearer(KEY_A)),
        }
        assert {k: r.status_code for k, r in owner_reads.items()} == {"get": 200, "heatmap": 200}
        others = {
            "get": c.get(f"/jobs/{job_id}", headers=bearer(KEY_B)),
            "delete": c.delete(f"/jobs/{job_id}", headers=bearer(KEY_B)),
            "heatmap": c.get(f"/jobs/{job_id}/heatmap.png", params={"span": "2:5"}, headers=bearer(KEY_B)),
        }
        for what, r in others.items():
            assert r.status_code == 404, (what, r.text)
            assert "another API key" in r.json()["detail"]
        # The other key's failed DELETE changed nothing; the owner's DELETE of a finished job is 409.
        assert c.get(f"/jobs/{job_id}", headers=bearer(KEY_A)).json()["status"] == "done"
        assert c.delete(f"/jobs/{job_id}", headers=bearer(KEY_A)).status_code == 409


def test_owner_can_cancel_a_queued_job_and_no_one_else_can(keyed):
    url, _, worker, _ = keyed
    with httpx.Client(base_url=url, timeout=60) as c:
        worker.send_signal(signal.SIGSTOP)  # nothing can start the job: it stays queued (heartbeat lives 6 s)
        try:
            queued = c.post(
                "/jobs",
                headers=bearer(KEY_B),
                files={"image": ("x.png", png_bytes())},
                data={"caption": "a cat", "steps": "1"},
            )
            assert queued.status_code == 202, queued.text
            job_id = queued.json()["id"]
            assert c.delete(f"/jobs/{job_id}", headers=bearer(KEY_A)).status_code == 404
            r = c.delete(f"/jobs/{job_id}", headers=bearer(KEY_B))
        finally:
            worker.send_signal(signal.SIGCONT)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        # The worker, running again, skips it: still cancelled, never computed.
        after = c.post(
            "/explain",
            headers=bearer(KEY_B),
            files={"image": ("x.png", png_bytes())},
            data={"caption": "a dog", "steps": "1"},
        )
        assert after.status_code == 200, after.text
        cancelled = c.get(f"/jobs/{job_id}", headers=bearer(KEY_B)).json()
        assert cancelled["status"] == "cancelled" and cancelled["result"] is None


def test_keys_appear_in_no_log_and_no_redis_value(keyed, redis_server):
    url, api, worker, prefix = keyed
    with httpx.Client(base_url=url, timeout=60) as c:
        for key in (KEY_A, KEY_B, WRONG):
            c.post(
                "/explain",
                headers=bearer(key),
                files={"image": ("x.png", png_bytes())},
                data={"caption": "a dog", "steps": "1"},
            )
            c.get("/models", headers=bearer(key))
    r = redis_server.client()
    values = []
    for name in r.scan_iter(f"{prefix}:*"):
        kind = r.type(name)
        if kind == "hash":
            values += [*r.hgetall(name).values()]
        elif kind == "string":
            values.append(r.get(name) if name.split(":")[-2] != "image" else "")
    assert values, "the jobs left records in Redis"
    logs = api.output + worker.output  # unbuffered: everything logged so far is in the files
    assert "POST /explain" in logs  # the access log was captured, so the check below means something
    for key in (KEY_A, KEY_B, WRONG):
        assert key not in logs
        assert not any(key in v for v in values)


def test_cors_is_off_by_default_and_limited_to_configured_origins(session_launcher):
    plain = session_launcher.embedded().wait_healthy()
    allowed = session_launcher.embedded(EXCLIP_CORS_ORIGINS="https://ok.example").wait_healthy()
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    try:
        for origin, proc, want in [
            ("https://ok.example", plain, None),
            ("https://ok.example", allowed, "https://ok.example"),
            ("https://evil.example", allowed, None),
        ]:
            get = httpx.get(proc.url + "/healthz", headers={"Origin": origin}, timeout=10)
            options = httpx.options(
                proc.url + "/explain", headers={"Origin": origin, **preflight}, timeout=10
            )
            assert get.headers.get("access-control-allow-origin") == want, (origin, proc.url)
            assert options.headers.get("access-control-allow-origin") == want, (origin, proc.url)
    finally:
        plain.stop()
        allowed.stop()
