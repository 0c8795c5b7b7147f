"""What ``/setup`` told the service about each Label Studio project, shared by every API replica.

Label Studio calls ``/setup`` when a backend is connected and again before every batch of
predictions. Behind a load balancer the ``/predict`` that follows may reach another replica, so the
setups live where the jobs do: in Redis (a hash of setups and a sorted set of when each project was
last set up), or in the process in embedded mode. A setup belongs to the API key that sent it: another
key's ``/setup`` of the same project id neither reads nor replaces it. A request for a project that no
replica has seen uses the settings (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, default thresholds).

Bounded whatever ``/setup`` is sent: only what predictions use is kept (the host, the token, this
backend's validated thresholds; ``SetupIn`` bounds the strings), for at most ``MAX_PROJECTS``
projects per API key (the one it set up longest ago is forgotten: no key can push out another's), and
in Redis for ``PROJECT_TTL_S``: each key's setups are a hash of their own that expires with the key's
order set, ``PROJECT_TTL_S`` after that key's last ``/setup`` (another key's ``/setup`` does not keep
them), and a project not set up again for ``PROJECT_TTL_S`` is dropped at its key's next ``/setup``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from service.redis_keys import Keys

MAX_PROJECTS = 1000
PROJECT_TTL_S = 30 * 24 * 3600

# KEYS: the key's setups hash, the key's order sorted set. ARGV: project, setup JSON, capacity, TTL s.
_REMEMBER = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], t, ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', t - tonumber(ARGV[4]))
local extra = redis.call('ZCARD', KEYS[2]) - #stale - tonumber(ARGV[3])
if extra > 0 then
  for _, project in ipairs(redis.call('ZRANGE', KEYS[2], #stale, #stale + extra - 1)) do
    table.insert(stale, project)
  end
end
if #stale > 0 then
  redis.call('ZREM', KEYS[2], unpack(stale))
  redis.call('HDEL', KEYS[1], unpack(stale))
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
"""


@dataclass(frozen=True)
class ProjectSetup:
    hostname: str | None
    access_token: str | None
    thresholds: dict[str, float] = field(default_factory=dict)  # the ones /setup's extra_params gave

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ProjectSetup:
        data = json.loads(text)
        return cls(data["hostname"], data["access_token"], data["thresholds"])


def project_key(owner: str | None, project: str | int | None) -> str:
    """One API key's project (another key's ``/setup`` of the same project id cannot change it).

    Label Studio names a project ``"<id>.<created timestamp>"``; the id alone is enough here.
    """
    return f"{owner or '-'}/{str(project or '').split('.', 1)[0]}"


class ProjectStore(Protocol):
    async def remember(self, owner: str | None, project: str, setup: ProjectSetup) -> None: ...

    async def get(self, owner: str | None, project: str | int | None) -> ProjectSetup | None: ...

    async def close(self) -> None: ...


class MemoryProjects:
    """Embedded mode: the one process is every replica."""

    def __init__(self, capacity: int = MAX_PROJECTS) -> None:
        self.capacity = capacity
        self._setups: dict[str | None, OrderedDict[str, ProjectSetup]] = {}  # per owner, oldest first

    async def remember(self, owner: str | None, project: str, setup: ProjectSetup) -> None:
        key, setups = project_key(owner, project), self._setups.setdefault(owner, OrderedDict())
        setups.pop(key, None)
        setups[key] = setup
        while len(setups) > self.capacity:
            setups.popitem(last=False)

    async def get(self, owner: str | None, project: str | int | None) -> ProjectSetup | None:
        setups = self._setups.get(owner)
        return None if setups is None else setups.get(project_key(owner, project))

    async def close(self) -> None:
        pass


class RedisProjects:
    """Every replica reads what any replica's ``/setup`` stored."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, capacity: int = MAX_PROJECTS, ttl_s: int = PROJECT_TTL_S
    ) -> None:
        self.redis, self.keys, self.capacity, self.ttl_s = redis, keys, capacity, ttl_s
        self._remember = redis.register_script(_REMEMBER)

    async def remember(self, owner: str | None, project: str, setup: ProjectSetup) -> None:
        await self._remember(
            keys=[self.keys.label_studio_setups(owner), self.keys.label_studio_setup_times(owner)],
            args=[project_key(owner, project), setup.to_json(), self.capacity, self.ttl_s],
        )

    async def get(self, owner: str | None, project: str | int | None) -> ProjectSetup | None:
        text = await self.redis.hget(self.keys.label_studio_setups(owner), project_key(owner, project))
        return None if text is None else ProjectSetup.from_json(text)

    async def close(self) -> None:
        await self.redis.aclose()
