"""REST service around the attribution library: API, Redis Streams queue, batching worker, CLI."""
