"""The bounds of a run that callers and tests need without importing FiftyOne."""

MAX_CONCURRENCY = 64
"""The most requests a run keeps in flight."""
MAX_IMAGE_BYTES = 15_000_000
"""The default largest image file a run reads: base64 makes it 20 MB, the service's default
``EXCLIP_MAX_UPLOAD_BYTES``; a larger file is its sample's error, unread."""
