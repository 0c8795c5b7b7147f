"""Job queue back-ends: Redis Streams and in-memory, one protocol per role (``base``)."""

from service.errors import QueueFull
from service.queue.base import (
    ROLES,
    Connection,
    Consumer,
    Delivery,
    ImageStore,
    JobQueue,
    JobStore,
    MetricsStore,
    WorkerRegistry,
)

__all__ = [
    "ROLES",
    "Connection",
    "Consumer",
    "Delivery",
    "ImageStore",
    "JobQueue",
    "JobStore",
    "MetricsStore",
    "QueueFull",
    "WorkerRegistry",
]
