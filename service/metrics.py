"""Prometheus metrics shared by all processes through the queue's counters hash.

Workers run in other processes, so they do not keep metrics in memory: they add increments to the
queue's metrics hash (``Keys.metrics`` in Redis, a dict in memory) and any API replica renders the
sum at ``GET /metrics``. The set of counters is fixed (outcomes × histogram buckets), so the hash
stays small; it expires 30 days after its last update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

OUTCOMES = ("done", "failed", "cancelled")

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "batch_size": ("Jobs computed per engine call", (1, 2, 4, 8, 16, 32, 64)),
    "queue_wait_seconds": (
        "Time from enqueue to the start of computing",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    ),
    "compute_seconds": (
        "Wall time of one engine call (a whole batch)",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    ),
}


def outcome(status: str) -> dict[str, float]:
    """Increment for one finished job."""
    return {f"jobs:{status}": 1.0}


def observe(name: str, value: float) -> dict[str, float]:
    """Increments for one observation of a histogram (non-cumulative bucket counts, sum, count)."""
    _, bounds = HISTOGRAMS[name]
    le = next((b for b in bounds if value <= b), math.inf)
    return {f"{name}:bucket:{le}": 1.0, f"{name}:sum": value, f"{name}:count": 1.0}


def merge(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


class _Snapshot(Collector):
    def __init__(self, counters: dict[str, float], depth: int, workers: int) -> None:
        self.counters, self.depth, self.workers = counters, depth, workers

    def collect(self) -> Iterable:
        c = self.counters
        yield GaugeMetricFamily(
            "exclip_queue_depth", "Jobs queued or running (not yet acknowledged)", value=self.depth
        )
        yield GaugeMetricFamily("exclip_workers", "Live workers (fresh heartbeat)", value=self.workers)
        yield CounterMetricFamily(
            "exclip_jobs_enqueued", "Jobs accepted into the queue", value=c.get("jobs_enqueued", 0.0)
        )
        jobs = CounterMetricFamily("exclip_jobs", "Finished jobs by outcome", labels=["outcome"])
        for status in OUTCOMES:
            jobs.add_metric([status], c.get(f"jobs:{status}", 0.0))
        yield jobs
        for name, (doc, bounds) in HISTOGRAMS.items():
            cumulative, buckets = 0.0, []
            for le in (*bounds, math.inf):
                cumulative += c.get(f"{name}:bucket:{le}", 0.0)
                buckets.append(("+Inf" if le == math.inf else str(le), cumulative))
            yield HistogramMetricFamily(
                f"exclip_{name}", doc, buckets=buckets, sum_value=c.get(f"{name}:sum", 0.0)
            )


def render(counters: dict[str, float], *, depth: int, workers: int) -> bytes:
    """Prometheus text exposition of the shared counters plus the current gauges."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(counters, depth, workers))
    return generate_latest(registry)
