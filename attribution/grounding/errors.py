"""Errors of the grounding benchmark: annotation files that cannot be read as the format they claim."""

from __future__ import annotations

from attribution.errors import AttributionError


class AnnotationError(AttributionError):
    """A COCO or Flickr30k Entities annotation file (or its images) is missing or malformed."""
