"""Redis Streams back-end: one stream per model, one consumer group of workers.

Layout (names in service.keys): the API writes the job record (hash), the image (string) and one
stream entry ``{job_id}`` in a single MULTI; workers read with XREADGROUP, take over entries left
unacknowledged by dead workers with XAUTOCLAIM, and XACK once the outcome is stored. After each
acknowledgement the stream is trimmed with XTRIM MINID below the oldest entry still pending or not
yet delivered, so no pending entry is ever dropped. Status changes that race (cancel vs. start) are
single Lua scripts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.errors import QueueFull
from service.jobs import Job
from service.keys import GROUP, METRICS_TTL_S, Keys
from service.queue.base import Delivery

# Mark a queued (or re-delivered running) job running and count the delivery; return the record.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return nil end
if s == 'queued' or s == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""

# Cancel only a job that no worker has started; return the record either way.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return nil end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""

# Write outcome fields only if the record still exists (never resurrect an expired job).
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


# Reset the idle time of the entries (ARGV[3..]) that consumer ARGV[2] of group ARGV[1] still owns.
_RENEW = """
local renewed = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""


def _pairs(flat: list[str] | None) -> dict[str, str] | None:
    return None if not flat else dict(zip(flat[::2], flat[1::2], strict=True))


def _after(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class RedisStreamsQueue:
    """``JobQueue`` on Redis Streams; ``r`` decodes responses to str, ``rb`` returns bytes (images)."""

    def __init__(self, r: aioredis.Redis, rb: aioredis.Redis, keys: Keys, *, ttl_s: int) -> None:
        self.r, self.rb, self.keys, self.ttl_s = r, rb, keys, ttl_s
        self._start = r.register_script(_START)
        self._cancel = r.register_script(_CANCEL)
        self._finish = r.register_script(_FINISH)
        self._renew = r.register_script(_RENEW)

    # --- API side -------------------------------------------------------------------------------
    async def ping(self) -> None:
        await self.r.ping()

    async def enqueue(self, job: Job, image: bytes, *, max_depth: int, depth_models: list[str]) -> None:
        if await self.depth(depth_models) >= max_depth:
            raise QueueFull(f"the queue holds {max_depth} or more jobs (EXCLIP_MAX_QUEUE); retry later")
        stream = self.keys.stream(job.model)
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.keys.job(job.id), mapping=job.to_fields())
            p.expire(self.keys.job(job.id), self.ttl_s)
            p.set(self.keys.image(job.id), image, ex=self.ttl_s)
            p.xadd(stream, {"job_id": job.id})
            p.expire(stream, self.ttl_s)  # an idle stream goes away; workers recreate their group
            p.hincrbyfloat(self.keys.metrics, "jobs_enqueued", 1)
            p.expire(self.keys.metrics, METRICS_TTL_S)
            await p.execute()

    async def get(self, job_id: str) -> Job | None:
        fields = await self.r.hgetall(self.keys.job(job_id))
        return Job.from_fields(fields) if fields else None

    async def cancel(self, job_id: str) -> Job | None:
        fields = _pairs(await self._cancel(keys=[self.keys.job(job_id)], args=[time.time(), self.ttl_s]))
        return Job.from_fields(fields) if fields else None

    async def depth(self, models: list[str]) -> int:
        total = 0
        for model in set(models):
            stream = self.keys.stream(model)
            try:
                groups = await self.r.xinfo_groups(stream)
            except ResponseError:  # no such stream: nothing queued
                continue
            group = next((g for g in groups if g["name"] == GROUP), None)
            if group is None or group.get("lag") is None:
                total += await self.r.xlen(stream)  # no worker yet, or lag unknown: an upper bound
            else:
                total += int(group["lag"]) + int(group["pending"])
        return total

    async def workers(self) -> list[dict[str, Any]]:
        names = await self.r.zrangebyscore(self.keys.workers, time.time(), "+inf")
        if not names:
            return []
        beats = await self.r.mget([self.keys.worker(n) for n in names])
        return [json.loads(b) for b in beats if b]

    async def add_metrics(self, increments: dict[str, float]) -> None:
        async with self.r.pipeline(transaction=True) as p:
            for name, value in increments.items():
                p.hincrbyfloat(self.keys.metrics, name, value)
            p.expire(self.keys.metrics, METRICS_TTL_S)
            await p.execute()

    async def read_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in (await self.r.hgetall(self.keys.metrics)).items()}

    # --- worker side ----------------------------------------------------------------------------
    async def _ensure_groups(self, models: list[str]) -> None:
        for model in models:
            try:  # id 0: entries added before the group existed are read too
                await self.r.xgroup_create(self.keys.stream(model), GROUP, id="0", mkstream=True)
                await self.r.expire(self.keys.stream(model), self.ttl_s, nx=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, consumer: str, models: list[str], count: int, block_ms: int) -> list[Delivery]:
        streams = {self.keys.stream(m): ">" for m in models}
        by_stream = {self.keys.stream(m): m for m in models}
        block = block_ms if block_ms > 0 else None  # BLOCK 0 would wait forever
        try:
            reply = await self.r.xreadgroup(GROUP, consumer, streams, count=count, block=block)
        except ResponseError as exc:
            if "UNBLOCKED" in str(exc):  # the stream expired under a blocked read: the caller reads again
                await self._ensure_groups(models)
                return []
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_groups(models)  # first start, or the stream expired / Redis restarted
            reply = await self.r.xreadgroup(GROUP, consumer, streams, count=count, block=block)
        return [Delivery(entry_id, fields["job_id"], by_stream[stream])
                for stream, entries in (reply or []) for entry_id, fields in entries]

    async def claim_stale(self, consumer: str, models: list[str], min_idle_s: float,
                          count: int) -> list[Delivery]:
        claimed: list[Delivery] = []
        for model in models:
            try:
                reply = await self.r.xautoclaim(self.keys.stream(model), GROUP, consumer,
                                                int(min_idle_s * 1000), start_id="0-0", count=count)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_groups([model])
                continue
            claimed += [Delivery(entry_id, fields["job_id"], model)
                        for entry_id, fields in reply[1] if fields]
        return claimed

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> None:
        for model in {d.model for d in deliveries}:
            ids = [d.entry_id for d in deliveries if d.model == model]
            await self._renew(keys=[self.keys.stream(model)], args=[GROUP, consumer, *ids])

    async def start(self, job_id: str) -> Job | None:
        fields = _pairs(await self._start(keys=[self.keys.job(job_id)], args=[time.time(), self.ttl_s]))
        return Job.from_fields(fields) if fields else None

    async def image(self, job_id: str) -> bytes | None:
        return await self.rb.get(self.keys.image(job_id))

    async def finish(self, job: Job) -> None:
        fields = {k: v for k, v in job.to_fields().items()
                  if k in ("status", "result", "error", "finished_at")}
        args: list[Any] = [self.ttl_s]
        for k, v in fields.items():
            args += [k, v]
        await self._finish(keys=[self.keys.job(job.id), self.keys.image(job.id)], args=args)

    async def ack(self, deliveries: list[Delivery]) -> None:
        by_model: dict[str, list[str]] = {}
        for d in deliveries:
            by_model.setdefault(d.model, []).append(d.entry_id)
        for model, ids in by_model.items():
            stream = self.keys.stream(model)
            await self.r.xack(stream, GROUP, *ids)
            await self._trim(stream)

    async def _trim(self, stream: str) -> None:
        """Drop entries that are delivered and acknowledged: below the oldest pending or undelivered."""
        groups = await self.r.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] == GROUP), None)
        if group is None:
            return
        pending = await self.r.xpending(stream, GROUP)
        min_id = pending["min"] if pending["pending"] else _after(group["last-delivered-id"])
        await self.r.xtrim(stream, minid=min_id, approximate=False)

    async def heartbeat(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        now = time.time()
        async with self.r.pipeline(transaction=True) as p:
            p.set(self.keys.worker(name), json.dumps(info), px=int(ttl_s * 1000))
            p.zadd(self.keys.workers, {name: now + ttl_s})
            p.zremrangebyscore(self.keys.workers, "-inf", now)
            p.expire(self.keys.workers, int(ttl_s) + 1)
            await p.execute()

    async def remove_worker(self, name: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(self.keys.worker(name))
            p.zrem(self.keys.workers, name)
            await p.execute()

    async def close(self) -> None:
        await self.r.aclose()
        await self.rb.aclose()
