"""Connections: Redis clients with short timeouts, and the choice of the job queue's back-end from
settings.

Short socket timeouts and a single quick retry make a lost Redis show up as an error within
seconds (the API turns it into 503) instead of a hang; redis-py reconnects by itself on the next
command once Redis is back.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.errors import QUEUE_DOWN  # noqa: F401 - re-exported: where callers look for it
from service.queue.base import JobQueue
from service.redis_keys import Keys
from service.settings import Settings


def redis_client(url: str, *, timeout_s: float, decode: bool = True) -> aioredis.Redis:
    """An asyncio Redis client that fails fast (within about ``2 * timeout_s``) when Redis is away."""
    return aioredis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        health_check_interval=30,
    )


def create_queue(settings: Settings) -> JobQueue:
    """Redis Streams when ``REDIS_URL`` is set, else the in-memory queue (embedded mode)."""
    if settings.redis_url:
        from service.queue.redis_streams import RedisStreamsQueue

        return RedisStreamsQueue(
            redis_client(settings.redis_url, timeout_s=settings.redis_timeout_s),
            redis_client(settings.redis_url, timeout_s=settings.redis_timeout_s, decode=False),
            Keys(settings.key_prefix),
            ttl_s=settings.result_ttl_s,
            max_stored_bytes=settings.max_stored_bytes,
        )
    from service.queue.memory import MemoryQueue

    return MemoryQueue(ttl_s=settings.result_ttl_s, max_stored_bytes=settings.max_stored_bytes)
