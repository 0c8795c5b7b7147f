"""Redis Streams back-end: one stream per model, one consumer group of workers.

Layout (names in service.redis_keys): the API writes the job record (hash), the image (string) and one
stream entry ``{job_id}`` in one Lua script (with the byte budget); workers read with XREADGROUP,
take over entries left unacknowledged by dead workers with XAUTOCLAIM, and XACK once the outcome is
stored. After each acknowledgement the stream is trimmed with XTRIM MINID below the oldest entry
still pending or not yet delivered, so no pending entry is ever dropped. Status changes that race
(cancel vs. start) are single Lua scripts. Anything Redis can lose — the stream, the group, the
whole database — is recreated when next needed (``_ensure_groups``) or skipped (a vanished stream
is not trimmed); a job whose record is gone is never computed (``start`` returns None).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import suppress
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.errors import QueueFull, WritesRefused
from service.jobs import Job, JobStatus
from service.queue.base import Delivery, FinishWaiters, JobQueue, wait_notified
from service.redis_keys import GROUP, METRICS_TTL_S, Keys

log = logging.getLogger("exclip.queue")

# The stored-bytes budget (keys: Keys.budget as KEYS[1..5]). Sizes of entries whose keys have
# expired are dropped by score (expiry time, or finish time + ttl); then finished jobs' images, and
# after all of them their results, are evicted oldest first until ``needed`` more bytes fit.
_BUDGET = """
local SIZES, TOTAL, UNFINISHED, IMAGES, RESULTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function prune(zset, max_score)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', max_score)) do
    redis.call('DECRBY', TOTAL, tonumber(redis.call('HGET', SIZES, m) or '0'))
    redis.call('HDEL', SIZES, m)
  end
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', max_score)
end
local function forget(m)
  redis.call('DECRBY', TOTAL, tonumber(redis.call('HGET', SIZES, m) or '0'))
  redis.call('HDEL', SIZES, m)
end
-- Evict until `needed` more bytes fit in `budget`; return the bytes still missing (0: they fit).
local function evict(now, ttl, budget, needed, image_prefix, job_prefix)
  prune(UNFINISHED, now)
  prune(IMAGES, now - ttl)
  prune(RESULTS, now - ttl)
  local total = tonumber(redis.call('GET', TOTAL) or '0')
  for _, zset in ipairs({IMAGES, RESULTS}) do
    while total + needed > budget do
      local popped = redis.call('ZPOPMIN', zset)
      if #popped == 0 then break end
      local m = popped[1]
      total = total - tonumber(redis.call('HGET', SIZES, m) or '0')
      forget(m)
      local id = string.sub(m, 3)
      if zset == IMAGES then
        redis.call('DEL', image_prefix .. id)
      elseif redis.call('EXISTS', job_prefix .. id) == 1 then
        redis.call('HDEL', job_prefix .. id, 'result')
        redis.call('HSET', job_prefix .. id, 'evicted', '1')
      end
    end
  end
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
  return math.max(total + needed - budget, 0)
end
"""

# KEYS: budget (5), job, image, stream, metrics. ARGV: now, ttl, budget, image prefix, job prefix,
# metrics ttl, job id, image bytes, batch tag, job fields... Returns 0 when the image does not fit.
_ENQUEUE = (
    _BUDGET
    + """
local now, ttl, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local id, image = ARGV[7], ARGV[8]
if evict(now, ttl, budget, string.len(image), ARGV[4], ARGV[5]) > 0 then return 0 end
redis.call('HSET', KEYS[6], unpack(ARGV, 10))
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('SET', KEYS[7], image, 'EX', ttl)
redis.call('XADD', KEYS[8], '*', 'job_id', id, 'batch', ARGV[9])
redis.call('EXPIRE', KEYS[8], ttl)  -- an idle stream goes away; workers recreate their group
redis.call('HINCRBYFLOAT', KEYS[9], 'jobs_enqueued', 1)
redis.call('EXPIRE', KEYS[9], ARGV[6])
redis.call('HSET', SIZES, 'i:' .. id, string.len(image))
redis.call('INCRBY', TOTAL, string.len(image))
redis.call('ZADD', UNFINISHED, now + ttl, 'i:' .. id)
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
return 1
"""
)

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

# Cancel only a job that no worker has started (its image goes: nothing will read it); return the
# record either way. KEYS: budget (5), job, image, channel. ARGV: now, ttl, job id.
_CANCEL = (
    _BUDGET
    + """
local s = redis.call('HGET', KEYS[6], 'status')
if not s then return nil end
if s == 'queued' then
  redis.call('HSET', KEYS[6], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[6], ARGV[2])
  redis.call('DEL', KEYS[7])
  redis.call('ZREM', UNFINISHED, 'i:' .. ARGV[3])
  forget('i:' .. ARGV[3])
  redis.call('PUBLISH', KEYS[8], ARGV[3])
end
return redis.call('HGETALL', KEYS[6])
"""
)

# Write outcome fields only if the record still exists (never resurrect an expired job); a done job
# keeps its image for heatmaps (evictable), a failed one drops it; the result joins the budget; then
# wake the waiters. KEYS: budget (5), job, image, channel. ARGV: now, ttl, budget, image prefix,
# job prefix, job id, done (1/0), fields...
_FINISH = (
    _BUDGET
    + """
local now, ttl, budget, id = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[6]
if redis.call('EXISTS', KEYS[6]) == 0 then return 0 end
redis.call('HSET', KEYS[6], unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('ZREM', UNFINISHED, 'i:' .. id)
if ARGV[7] == '1' and redis.call('EXPIRE', KEYS[7], ttl) == 1 then
  redis.call('ZADD', IMAGES, now, 'i:' .. id)
else
  redis.call('DEL', KEYS[7])
  forget('i:' .. id)
end
local result = redis.call('HGET', KEYS[6], 'result')
if result then
  redis.call('HSET', SIZES, 'r:' .. id, string.len(result))
  redis.call('INCRBY', TOTAL, string.len(result))
  redis.call('ZADD', RESULTS, now, 'r:' .. id)
end
evict(now, ttl, budget, 0, ARGV[4], ARGV[5])
redis.call('PUBLISH', KEYS[8], id)
return 1
"""
)

# Reset the idle time of the entries (ARGV[4..]) that consumer ARGV[2] of group ARGV[1] still owns,
# and keep the stream and the jobs' records and images (KEYS[2..]) from expiring under them (ARGV[3]:
# ttl). -1: the stream or group is gone.
_RENEW = """
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
if redis.call('EXPIRE', KEYS[1], ARGV[3]) == 0 then return -1 end
local renewed = 0
for i = 4, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p['err'] then return -1 end
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""


ScriptArg = bytes | str | int | float  # what a Lua script's ARGV takes

MEMORY_RESERVE = 0.1
"""Share of Redis's ``maxmemory`` a new job may not use: room for the jobs already accepted to start,
store their results and for workers to heartbeat. Redis refuses a write only once it is over the
limit, so without a reserve the job that fills it is accepted and then cannot be started."""


def _pairs(flat: list[str] | None) -> dict[str, str] | None:
    return None if not flat else dict(zip(flat[::2], flat[1::2], strict=True))


def _after(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


class RedisStreamsQueue(JobQueue):
    """``JobQueue`` on Redis Streams; ``r`` decodes responses to str, ``rb`` returns bytes (images).

    Images and results are kept within ``max_stored_bytes`` as in the in-memory queue (Lua scripts
    keep a size index, see ``Keys.budget``). Finished jobs are announced on ``Keys.finished``; one
    subscription per process (started by the first waiting request) wakes all its waiters.
    """

    def __init__(
        self, r: aioredis.Redis, rb: aioredis.Redis, keys: Keys, *, ttl_s: int, max_stored_bytes: int = 2**62
    ) -> None:
        # redis-py types every reply as bytes | str whatever the client decodes, so its replies are
        # held as Any here: ``r`` decodes them to str, ``rb`` (images) leaves them bytes.
        self.r: Any = r
        self.rb: Any = rb
        self.keys, self.ttl_s = keys, ttl_s
        self.max_stored_bytes = max_stored_bytes
        self._enqueue = r.register_script(_ENQUEUE)
        self._start = r.register_script(_START)
        self._cancel = r.register_script(_CANCEL)
        self._finish = r.register_script(_FINISH)
        self._renew = r.register_script(_RENEW)
        self._waiters = FinishWaiters()
        self._listener: asyncio.Task | None = None
        self._listening = asyncio.Event()
        self._scripts_loaded = False

    def _eviction_args(self) -> list[ScriptArg]:
        """ARGV[1..5] of the scripts that call ``_BUDGET``'s ``evict``: now, the TTL, the byte budget,
        and the image and job key prefixes (an evicted member's keys)."""
        return [time.time(), self.ttl_s, self.max_stored_bytes, self.keys.image(""), self.keys.job("")]

    # --- API side -------------------------------------------------------------------------------
    async def ping(self) -> None:
        await self.r.ping()
        await self._check_memory(0)

    async def _check_memory(self, adding: int) -> None:
        """Raise ``WritesRefused`` when ``adding`` more bytes would leave Redis less than its reserve
        (``MEMORY_RESERVE`` of ``maxmemory``; nothing to check without a ``maxmemory``)."""
        try:
            memory = await self.r.info("memory")
        except ResponseError as exc:  # INFO disabled (some managed Redis): Redis's own refusals remain
            log.debug("INFO memory unavailable (%s); not checking the memory left", exc)
            return
        limit, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
        if limit and used + adding > limit * (1 - MEMORY_RESERVE):
            raise WritesRefused(
                f"Redis's memory is nearly full ({used} of maxmemory {limit} bytes used; a new job "
                f"may use up to {1 - MEMORY_RESERVE:.0%}), so it could not run"
            )

    async def warm_up(self) -> None:
        self._ensure_listener()
        if not self._scripts_loaded:  # once: after a Redis restart the NOSCRIPT fallback reloads them
            for script in (self._enqueue, self._start, self._cancel, self._finish, self._renew):
                await self.r.script_load(script.script)
            self._scripts_loaded = True

    async def enqueue(self, job: Job, image: bytes, *, max_depth: int, depth_models: list[str]) -> None:
        if await self.depth(depth_models) >= max_depth:
            raise QueueFull(f"the queue holds {max_depth} or more jobs (EXCLIP_MAX_QUEUE); retry later")
        await self._check_memory(len(image))
        fields = [x for kv in job.to_fields().items() for x in kv]
        keys = [
            *self.keys.budget,
            self.keys.job(job.id),
            self.keys.image(job.id),
            self.keys.stream(job.model),
            self.keys.metrics,
        ]
        args: list[ScriptArg] = [
            *self._eviction_args(),
            METRICS_TTL_S,
            job.id,
            image,
            job.batch_tag,
            *fields,
        ]
        if not await self._enqueue(keys=keys, args=args):
            raise QueueFull(
                f"the images of unfinished jobs fill the stored-bytes budget of "
                f"{self.max_stored_bytes} bytes (EXCLIP_MAX_STORED_BYTES); retry later"
            )

    async def get(self, job_id: str) -> Job | None:
        fields = await self.r.hgetall(self.keys.job(job_id))
        return Job.from_fields(fields) if fields else None

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job | None:
        self._ensure_listener()
        if not self._listening.is_set():  # a first waiter: do not miss a finish while subscribing
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._listening.wait(), min(timeout_s, 1.0))
        return await wait_notified(self.get, self._waiters, job_id, timeout_s, safety_poll_s=1.0)

    async def _listen(self) -> None:
        """Wake the waiters of each job announced on the finished channel; resubscribe after errors."""
        backoff = 0.1
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(self.keys.finished)
                self._listening.set()
                self._waiters.notify_all()  # a finish may have been missed while not subscribed
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._waiters.notify(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - waiters fall back to polling meanwhile
                self._listening.clear()
                log.warning(
                    "finish notifications interrupted (%s: %s); resubscribing", type(exc).__name__, exc
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with suppress(Exception):
                    await pubsub.aclose()

    async def cancel(self, job_id: str) -> Job | None:
        keys = [*self.keys.budget, self.keys.job(job_id), self.keys.image(job_id), self.keys.finished]
        fields = _pairs(await self._cancel(keys=keys, args=[time.time(), self.ttl_s, job_id]))
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
        return [
            Delivery(entry_id, fields["job_id"], by_stream[stream], fields.get("batch", ""))
            for stream, entries in (reply or [])
            for entry_id, fields in entries
        ]

    async def claim_stale(
        self, consumer: str, models: list[str], min_idle_s: float, count: int
    ) -> list[Delivery]:
        claimed: list[Delivery] = []
        for model in models:
            try:
                reply = await self.r.xautoclaim(
                    self.keys.stream(model),
                    GROUP,
                    consumer,
                    int(min_idle_s * 1000),
                    start_id="0-0",
                    count=count,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_groups([model])
                continue
            claimed += [
                Delivery(entry_id, fields["job_id"], model, fields.get("batch", ""))
                for entry_id, fields in reply[1]
                if fields
            ]
        return claimed

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> None:
        for model in {d.model for d in deliveries}:
            mine = [d for d in deliveries if d.model == model]
            stream, ids = self.keys.stream(model), [d.entry_id for d in mine]
            job_keys = [k for d in mine for k in (self.keys.job(d.job_id), self.keys.image(d.job_id))]
            if await self._renew(keys=[stream, *job_keys], args=[GROUP, consumer, self.ttl_s, *ids]) == -1:
                log.warning(
                    "stream %s or its group vanished under %d job(s) in flight (Redis restarted or "
                    "flushed?); their records decide whether they are stored",
                    stream,
                    len(ids),
                )

    async def start(self, job_id: str) -> Job | None:
        fields = _pairs(await self._start(keys=[self.keys.job(job_id)], args=[time.time(), self.ttl_s]))
        return Job.from_fields(fields) if fields else None

    async def image(self, job_id: str) -> bytes | None:
        return await self.rb.get(self.keys.image(job_id))

    async def finish(self, job: Job) -> None:
        fields = [x for kv in job.to_fields().items() if kv[0] in Job.OUTCOME_FIELDS for x in kv]
        keys = [*self.keys.budget, self.keys.job(job.id), self.keys.image(job.id), self.keys.finished]
        args: list[ScriptArg] = [
            *self._eviction_args(),
            job.id,
            int(job.status is JobStatus.DONE),
            *fields,
        ]
        await self._finish(keys=keys, args=args)

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
        try:
            groups = await self.r.xinfo_groups(stream)
        except ResponseError:  # the stream is gone (expired, flushed, Redis restarted): nothing to trim
            log.warning("stream %s vanished before its entries were acknowledged", stream)
            return
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
        if self._listener is not None:
            self._listener.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self.r.aclose()
        await self.rb.aclose()
