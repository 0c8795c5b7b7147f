"""Job queue back-ends: Redis Streams and in-memory, one protocol (``base``)."""

from service.queue.base import Delivery, JobQueue, QueueFull, wait_finished

__all__ = ["Delivery", "JobQueue", "QueueFull", "wait_finished"]
