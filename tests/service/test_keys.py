"""API keys fail closed, and job owners are HMAC tags that API replicas sharing a secret agree on."""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
import pytest

from service.dependencies import owner_tag
from service.errors import ConfigError
from service.redis_keys import Keys
from service.settings import Settings
from tests.service.conftest import png_bytes

KEY = "gamma-key-5c1e0b7a93"


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n   \n# another\n", "dir"])
def test_a_keys_file_that_is_missing_unreadable_or_empty_refuses_to_load(tmp_path, content):
    path = tmp_path / "keys.txt"
    if content == "dir":
        path.mkdir()  # unreadable as a file, whoever runs the test (root reads any mode)
    elif content is not None:
        path.write_text(content)
    settings = Settings(api_keys="also-a-key", api_keys_file=path)
    with pytest.raises(ConfigError, match=f"EXCLIP_API_KEYS_FILE={path}"):
        settings.keys  # noqa: B018


def test_keys_come_from_both_sources_without_comments(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# ops keys\n{KEY}\n\n  other-key  \n")
    assert Settings(api_keys="env-key", api_keys_file=path).keys == ("env-key", KEY, "other-key")


def test_the_owner_tag_is_an_hmac_with_the_server_secret():
    secret = b"s3cret"
    tag = owner_tag(KEY, secret)
    assert tag == hmac.new(secret, KEY.encode(), hashlib.sha256).hexdigest()
    assert tag != hashlib.sha256(KEY.encode()).hexdigest() and tag != owner_tag(KEY, b"other")
    assert Settings(owner_secret="abc").owner_key == b"abc"
    random_a, random_b = Settings().owner_key, Settings().owner_key
    assert len(random_a) == 32 and random_a != random_b  # unset: random per process (one API only)


@pytest.mark.parametrize("content", [None, "# no keys here\n"])
def test_serve_with_a_bad_keys_file_exits_naming_the_file(launcher, tmp_path, content):
    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_text(content)
    proc = launcher.embedded(EXCLIP_API_KEYS_FILE=str(path))
    assert proc.proc.wait(60) == 2
    assert f"EXCLIP_API_KEYS_FILE={path}" in proc.output
    assert "Uvicorn running" not in proc.output  # it never served, with or without authentication


@pytest.mark.slow  # three processes start: about a minute on a busy 2-core machine
def test_replicas_sharing_the_secret_serve_each_others_jobs_and_redis_holds_only_the_tag(
    launcher, redis_server
):
    env = {"EXCLIP_API_KEYS": KEY, "EXCLIP_OWNER_SECRET": "shared-across-replicas"}
    first, second = launcher.api(**env), launcher.api(**env)
    launcher.worker()
    for api in (first, second):
        api.wait_ready(timeout_s=180)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        first.url + "/jobs",
        headers=auth,
        files={"image": ("x.png", png_bytes())},
        data={"caption": "a dog", "steps": "1"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while (seen := httpx.get(f"{second.url}/jobs/{job_id}", headers=auth, timeout=10)).status_code == 200:
        if seen.json()["status"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen.status_code == 200 and seen.json()["status"] == "done", seen.text
    stored = redis_server.client().hget(Keys(launcher.key_prefix).job(job_id), "owner")
    assert stored == owner_tag(KEY, b"shared-across-replicas")  # a replica with another secret finds no job
    assert stored != owner_tag(KEY, b"another-secret") and stored != hashlib.sha256(KEY.encode()).hexdigest()
