"""Every Redis key the service writes, in one place.

All keys start with ``EXCLIP_KEY_PREFIX`` so several deployments (or tests) can share one Redis.
Every key expires: job records and images after ``EXCLIP_RESULT_TTL_S`` (refreshed on each update),
heartbeats (and the worker index) after three heartbeat periods, the metrics hash ``METRICS_TTL_S``
after its last update, the byte-budget index ``EXCLIP_RESULT_TTL_S`` after its last change, and each
job stream ``EXCLIP_RESULT_TTL_S`` after its last entry (renewed by the heartbeat of a worker holding
its entries), Label Studio project setups 30 days after the last ``/setup``; streams are also trimmed by
workers.
"""

from __future__ import annotations

from dataclasses import dataclass

METRICS_TTL_S = 30 * 24 * 3600
"""The metrics hash holds a bounded set of counters (one per outcome and histogram bucket)."""

GROUP = "workers"
"""The consumer group all workers read the job streams with."""


@dataclass(frozen=True)
class Keys:
    prefix: str

    def stream(self, model: str) -> str:
        """Job stream of one model: workers read only the streams of the models they hold."""
        return f"{self.prefix}:stream:{model}"

    def job(self, job_id: str) -> str:
        """Hash with the job record (status, request, result, error, owner hash, ...)."""
        return f"{self.prefix}:job:{job_id}"

    def image(self, job_id: str) -> str:
        """The uploaded image bytes, stored once per job whatever the number of captions."""
        return f"{self.prefix}:image:{job_id}"

    def worker(self, name: str) -> str:
        """Heartbeat of one worker: JSON with the models it holds; expires when the worker dies."""
        return f"{self.prefix}:worker:{name}"

    @property
    def workers(self) -> str:
        """Sorted set of worker names scored by heartbeat expiry time, so no SCAN is needed."""
        return f"{self.prefix}:workers"

    @property
    def metrics(self) -> str:
        """Hash of counters that workers and API replicas add to and /metrics reads."""
        return f"{self.prefix}:metrics"

    @property
    def finished(self) -> str:
        """Pub/sub channel: each finished (or cancelled) job's id, so waiting requests wake at once."""
        return f"{self.prefix}:finished"

    @property
    def stored_sizes(self) -> str:
        """Hash ``i:<job id>`` (image) / ``r:<job id>`` (result) -> bytes, for the stored-bytes budget."""
        return f"{self.prefix}:stored:sizes"

    @property
    def stored_total(self) -> str:
        """Sum of ``stored_sizes``: the bytes the budget (EXCLIP_MAX_STORED_BYTES) bounds."""
        return f"{self.prefix}:stored:total"

    @property
    def unfinished_images(self) -> str:
        """Sorted set of images of unfinished jobs (never evicted) scored by their expiry time."""
        return f"{self.prefix}:stored:unfinished"

    @property
    def evictable_images(self) -> str:
        """Sorted set of images of done jobs (kept for heatmaps) scored by finish time: evicted first."""
        return f"{self.prefix}:stored:images"

    @property
    def evictable_results(self) -> str:
        """Sorted set of results of finished jobs scored by finish time: evicted after every image."""
        return f"{self.prefix}:stored:results"

    def label_studio_setups(self, owner: str | None) -> str:
        """Hash of one key's (owner tag's) projects: ``<owner tag>/<Label Studio project id>`` -> what
        its last ``/setup`` said (host, token, thresholds). It expires with the key's sorted set below."""
        return f"{self.prefix}:label-studio:setups:{owner or '-'}"

    def label_studio_setup_times(self, owner: str | None) -> str:
        """Sorted set of one key's (owner tag's) projects scored by their last ``/setup``: the oldest is
        forgotten first."""
        return f"{self.prefix}:label-studio:setup-times:{owner or '-'}"

    @property
    def budget(self) -> list[str]:
        """The budget index keys, in the order the Lua scripts take them."""
        return [
            self.stored_sizes,
            self.stored_total,
            self.unfinished_images,
            self.evictable_images,
            self.evictable_results,
        ]
