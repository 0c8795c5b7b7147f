"""Errors of the grounding benchmark: annotation files that cannot be read as the format they claim,
and a figure asked for without the plotting extra installed."""

from __future__ import annotations

from attribution.errors import AttributionError


class AnnotationError(AttributionError):
    """An input file of the benchmark is missing or malformed: COCO or Flickr30k Entities annotations,
    their images, or a result file to merge."""


class PlottingUnavailable(AttributionError):
    """A figure was asked for but matplotlib (the ``evaluation`` extra) is not installed."""
