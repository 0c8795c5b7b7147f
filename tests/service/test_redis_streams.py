"""Redis-specific guarantees of the Streams back-end: every key expires, trimming keeps pending entries."""

from __future__ import annotations

import pytest

from service.connections import create_queue
from service.jobs import JobStatus
from service.redis_keys import GROUP, Keys
from service.settings import Settings
from tests.service.conftest import make_job

pytestmark = pytest.mark.anyio
MODEL = "exclip-tiny"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def queue(redis_server, key_prefix):
    q = create_queue(Settings(redis_url=redis_server.url, key_prefix=key_prefix, result_ttl_s=600))
    yield q
    await q.close()


async def test_every_key_the_service_writes_expires(queue, redis_server, key_prefix):
    jobs = [make_job(steps=3, captions=("a",)) for _ in range(3)]
    for j in jobs:
        await queue.enqueue(j, b"img", max_depth=100, depth_models=[MODEL])
    deliveries = await queue.read("w1", [MODEL], count=8, block_ms=100)
    for j in jobs:
        started = await queue.start(j.id)
        started.status, started.result = JobStatus.DONE, {"captions": []}
        await queue.finish(started)
    await queue.ack(deliveries)
    await queue.cancel(jobs[0].id)
    await queue.heartbeat("w1", {"name": "w1", "models": []}, ttl_s=5)
    await queue.add_metrics({"jobs:done": 3})
    r = redis_server.client()
    keys = r.keys(f"{key_prefix}:*")
    assert {Keys(key_prefix).stream(MODEL), Keys(key_prefix).metrics, Keys(key_prefix).workers} <= set(keys)
    k = Keys(key_prefix)
    # 3 job records, 3 images (kept for heatmaps), stream, metrics, worker index, heartbeat, and the
    # budget index: sizes, total, done images, results (no unfinished image is left)
    assert len(keys) == 3 + 3 + 4 + 4
    assert {k.stored_sizes, k.stored_total, k.evictable_images, k.evictable_results} <= set(keys)
    assert {k: r.ttl(k) for k in keys if r.ttl(k) <= 0} == {}


async def test_ack_trims_the_stream_but_keeps_pending_and_unread_entries(queue, redis_server, key_prefix):
    for _ in range(4):
        await queue.enqueue(make_job(steps=3, captions=("a",)), b"img", max_depth=100, depth_models=[MODEL])
    first, second = await queue.read("w1", [MODEL], count=2, block_ms=100)
    stream = Keys(key_prefix).stream(MODEL)
    r = redis_server.client()
    await queue.ack([second])  # `first` is still pending: nothing from it on may go
    assert [e[0] for e in r.xrange(stream)][0] == first.entry_id and r.xlen(stream) == 4
    await queue.ack([first])
    assert r.xlen(stream) == 2  # the two never-read entries stay
    rest = await queue.read("w1", [MODEL], count=8, block_ms=100)
    assert len(rest) == 2 and r.xpending(stream, GROUP)["pending"] == 2
    await queue.ack(rest)
    assert r.xlen(stream) == 0 and await queue.depth([MODEL]) == 0
