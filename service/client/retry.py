"""When to send a refused call again: 429 and 503 are retried, honouring ``Retry-After``, within a
bounded total wait; without the header the delays double from ``backoff_s`` (no jitter: a run's
timing is reproducible).

A refused ``POST`` is sent again: 429 and 503 mean the job was not queued — except a 503 for a queue
that failed during the enqueue, whose detail names the job that may exist; sending again then may
compute the request twice, never lose it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({429, 503})  # queue full; no worker, queue down, render slots busy


@dataclass(frozen=True)
class RetryPolicy:
    """``max_wait_s``: seconds one call may spend sleeping between its tries, all tries together; a
    delay that would go past it is not slept — the refusal is raised at once (``ServiceBusy``)."""

    max_wait_s: float = 60.0
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0

    def delay(self, status: int, retry_after: float | None, attempt: int, waited: float) -> float | None:
        """Seconds to sleep before try ``attempt + 1`` (0-based count of retries so far), or None: stop."""
        if status not in RETRY_STATUSES:
            return None
        if retry_after is None:
            delay = min(self.backoff_s * 2**attempt, self.backoff_max_s)
        else:
            delay = max(retry_after, 0.0)
        return delay if waited + delay <= self.max_wait_s else None


NO_RETRY = RetryPolicy(max_wait_s=0.0)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)
