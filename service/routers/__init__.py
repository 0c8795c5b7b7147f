"""The API's routers: explain/jobs, models, health, metrics."""
