"""Job queue back-ends: Redis Streams and in-memory, one protocol (``base``)."""

from service.errors import QueueFull
from service.queue.base import Delivery, JobQueue

__all__ = ["Delivery", "JobQueue", "QueueFull"]
