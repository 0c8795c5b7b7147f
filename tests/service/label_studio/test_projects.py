"""What ``/setup`` said about a project reaches every API replica, and stays bounded.

The store's contract on both back-ends (memory: embedded mode; Redis: shared by replicas), then two
API replicas over HTTP on one Redis: Label Studio's ``/setup`` reaches one, the ``/predict`` that
follows reaches the other, which must still use the project's thresholds.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from service.app import create_app
from service.dependencies import owner_tag
from service.label_studio.projects import (
    PROJECT_TTL_S,
    MemoryProjects,
    ProjectSetup,
    ProjectStore,
    RedisProjects,
    project_key,
)
from service.redis_keys import Keys
from service.settings import Settings
from testing import wait_until_ready
from tests.service.label_studio.scenario import CAPTION, DOCUMENTED, PHRASES, SCENE_PATH

SETUP = ProjectSetup("http://label-studio:8080", "token-1", {"mask_level": 0.3})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def make_store(request, redis_server, key_prefix) -> AsyncIterator:
    """Builds stores of one back-end; with Redis, every store built is another replica."""
    stores: list[ProjectStore] = []

    def make(capacity: int = 1000) -> ProjectStore:
        if request.param == "memory":
            store: ProjectStore = stores[0] if stores else MemoryProjects(capacity)
        else:
            client = aioredis.from_url(redis_server.url, decode_responses=True)
            store = RedisProjects(client, Keys(key_prefix), capacity=capacity)
        stores.append(store)
        return store

    yield make
    for store in {id(s): s for s in stores}.values():
        await store.close()


@pytest.mark.anyio
async def test_a_setup_is_read_back_by_project_id(make_store) -> None:
    store = make_store()
    await store.remember(None, "21.1700000000", SETUP)
    assert await store.get(None, "21.1700000000") == SETUP
    assert await store.get(None, 21) == SETUP  # a task names its project by id only
    assert await store.get(None, "22") is None
    assert await store.get(None, None) is None


@pytest.mark.anyio
async def test_the_project_set_up_longest_ago_is_forgotten(make_store) -> None:
    store = make_store(capacity=3)
    for project in ("1", "2", "3"):
        await store.remember(None, project, SETUP)
    await store.remember(None, "1", SETUP)  # set up again: now the newest
    await store.remember(None, "4", SETUP)
    assert [await store.get(None, p) is not None for p in ("1", "2", "3", "4")] == [True, False, True, True]


@pytest.mark.anyio
async def test_no_key_can_push_out_another_keys_setups(make_store) -> None:
    store = make_store(capacity=3)
    await store.remember("owner-b", "9", SETUP)
    for project in ("1", "2", "3", "4"):  # owner-a past the capacity: its own oldest goes
        await store.remember("owner-a", project, SETUP)
    assert await store.get("owner-b", "9") == SETUP
    assert [await store.get("owner-a", p) is not None for p in ("1", "2", "3", "4")] == [
        False,
        True,
        True,
        True,
    ]


@pytest.mark.anyio
async def test_a_setup_belongs_to_the_key_that_sent_it(make_store) -> None:
    store = make_store()
    theirs = ProjectSetup("http://attacker:9", "token-x", {"mask_level": 1.0})
    await store.remember("owner-a", "3", SETUP)
    await store.remember("owner-b", "3", theirs)  # another key, the same project id
    assert await store.get("owner-a", "3") == SETUP
    assert await store.get("owner-b", "3") == theirs
    assert await store.get(None, "3") is None


@pytest.mark.anyio
async def test_replicas_share_setups_through_redis(redis_server, key_prefix) -> None:
    clients = [aioredis.from_url(redis_server.url, decode_responses=True) for _ in range(2)]
    first, second = (RedisProjects(c, Keys(key_prefix)) for c in clients)
    await first.remember(None, "7", SETUP)
    assert await second.get(None, "7") == SETUP
    later = ProjectSetup("http://label-studio:8080", "token-2", {})
    await second.remember(None, "7", later)
    assert await first.get(None, "7") == later
    keys = Keys(key_prefix)
    for key in (keys.label_studio_setups(None), keys.label_studio_setup_times(None)):
        assert 0 < await clients[0].ttl(key) <= PROJECT_TTL_S  # every key the service writes expires
    for store in (first, second):
        await store.close()


@pytest.mark.anyio
async def test_a_keys_setups_expire_with_it_not_with_another_keys(redis_server, key_prefix) -> None:
    """Owner A's setup is not kept alive by owner B's later /setup; B's lives on."""
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    store = RedisProjects(client, Keys(key_prefix), ttl_s=2)
    await store.remember("owner-a", "1", SETUP)
    time.sleep(1.2)
    await store.remember("owner-b", "2", SETUP)
    time.sleep(1.2)  # 2.4 s after A's setup, 1.2 s after B's
    assert await store.get("owner-a", "1") is None
    assert await store.get("owner-b", "2") == SETUP
    assert await client.keys(f"{key_prefix}:label-studio:*owner-a*") == []  # nothing of A is left
    await store.close()


@pytest.mark.anyio
async def test_a_project_not_set_up_again_is_dropped_at_its_keys_next_setup(redis_server, key_prefix) -> None:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    store = RedisProjects(client, Keys(key_prefix), ttl_s=2)
    await store.remember("owner-a", "1", SETUP)
    time.sleep(1.2)
    await store.remember("owner-a", "2", SETUP)
    time.sleep(1.2)
    await store.remember("owner-a", "3", SETUP)  # project 1 was set up 2.4 s ago: past its lifetime
    assert [await store.get("owner-a", p) is not None for p in ("1", "2", "3")] == [False, True, True]
    assert await client.zcard(Keys(key_prefix).label_studio_setup_times("owner-a")) == 2
    await store.close()


# --- over HTTP -------------------------------------------------------------------------------------


def _setup_body(project: str, **extra) -> dict:
    body = {
        "project": project,
        "schema": DOCUMENTED,
        "hostname": "",
        "access_token": "",
        "extra_params": None,
    }
    return body | extra


def _predict(client: TestClient, project: str) -> list[dict]:
    """The prediction's regions, without their ids (new for every prediction)."""
    task = {
        "id": 1,
        "project": int(project),
        "data": {"image": SCENE_PATH, "caption": CAPTION, "phrases": PHRASES},
    }
    reply = client.post("/label-studio/predict", json={"tasks": [task], "label_config": DOCUMENTED})
    assert reply.status_code == 200, reply.text
    (prediction,) = reply.json()["results"]
    assert "result" in prediction, prediction
    return [{k: v for k, v in region.items() if k != "id"} for region in prediction["result"]]


@pytest.fixture(scope="module")
def replicas(
    redis_server, tiny_checkpoint, tiny_loaded, image_host
) -> Iterator[tuple[TestClient, TestClient]]:
    """Two API replicas on one Redis; the first also runs a worker (the tiny model, in this process)."""
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix=f"replicas{time.monotonic_ns()}",
        model="exclip-tiny",
        pretrained=tiny_checkpoint,
        device="cpu",
        label_studio_url=image_host,
    )
    with (
        TestClient(create_app(settings, worker_models=[tiny_loaded])) as first,
        TestClient(create_app(settings)) as second,
    ):
        wait_until_ready(second)
        yield first, second


def test_a_replica_that_missed_setup_predicts_with_the_projects_thresholds(replicas) -> None:
    first, second = replicas
    reply = first.post(
        "/label-studio/setup", json=_setup_body("41.1700000000", extra_params={"mask_level": 0.05})
    )
    assert reply.status_code == 200, reply.text
    on_second = _predict(second, "41")
    assert on_second == _predict(first, "41")
    # Project 42 had no /setup: the default mask_level (0.5) keeps fewer patches than 0.05 does.
    assert on_second != _predict(second, "42")


def test_setup_strings_are_bounded(replicas) -> None:
    first, _ = replicas
    for field, size in (("project", 201), ("hostname", 2049), ("access_token", 4097)):
        reply = first.post("/label-studio/setup", json=_setup_body("43") | {field: "x" * size})
        assert reply.status_code == 422, (field, reply.text)
        assert field in reply.text


def test_only_the_thresholds_of_extra_params_are_kept(replicas, redis_server) -> None:
    first, _ = replicas
    # Keys that are not this backend's thresholds may be anything; none of it is stored.
    extra = {"mask_level": 0.4, "notes": "y" * 1_000_000}
    assert first.post("/label-studio/setup", json=_setup_body("44", extra_params=extra)).status_code == 200
    keys = Keys(first.app.state.settings.key_prefix)
    stored = redis.Redis.from_url(redis_server.url).hget(
        keys.label_studio_setups(None), project_key(None, "44")
    )
    assert stored is not None and len(stored) < 200
    assert ProjectSetup.from_json(stored).thresholds == {"mask_level": 0.4}


# --- keys ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(redis_url=None, api_keys="key-a,key-b"))) as client:
        yield client


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"label-studio:{key}".encode()).decode()}


@pytest.mark.anyio
async def test_setup_over_http_is_kept_for_its_key_only(keyed_client: TestClient) -> None:
    reply = keyed_client.post("/label-studio/setup", json=_setup_body("5"), headers=_basic("key-a"))
    assert reply.status_code == 200, reply.text
    store, secret = keyed_client.app.state.label_studio.projects, keyed_client.app.state.settings.owner_key
    assert await store.get(owner_tag("key-a", secret), "5") is not None
    assert await store.get(owner_tag("key-b", secret), "5") is None


JSON = {"content-type": "application/json"}
MANY_TASKS = b'{"tasks": [' + b"{}," * 100_000 + b"{}]}"


@pytest.mark.parametrize("route", ["/label-studio/setup", "/label-studio/predict"])
@pytest.mark.parametrize("body", [b"{not json", MANY_TASKS])
def test_the_key_is_checked_before_the_body_is_read(
    keyed_client: TestClient, route: str, body: bytes
) -> None:
    reply = keyed_client.post(route, content=body, headers=JSON)
    assert reply.status_code == 401, reply.text[:200]


@pytest.mark.parametrize("route", ["/label-studio/setup", "/label-studio/predict"])
def test_with_the_key_a_malformed_body_is_still_422(keyed_client: TestClient, route: str) -> None:
    reply = keyed_client.post(route, content=b"{not json", headers=JSON | _basic("key-b"))
    assert reply.status_code == 422, reply.text[:200]
    assert reply.json()["detail"][0]["loc"][0] == "body"
