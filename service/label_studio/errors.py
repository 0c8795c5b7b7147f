"""Errors of the Label Studio backend; each is answered with a 4xx whose message says what to fix."""

from __future__ import annotations

from service.errors import RequestInvalid


class LabelConfigInvalid(RequestInvalid):
    """The project's label config lacks a tag the backend needs, or is not acceptable XML."""


class TaskInvalid(RequestInvalid):
    """A task's data cannot be explained (no caption, a phrase not in the caption, ...)."""


class ImageRefused(RequestInvalid):
    """A task image URL the backend will not fetch (another host, another scheme, a redirect, ...)."""


class ImageUnavailable(RequestInvalid):
    """The Label Studio host did not give the image (error status, too large, unreachable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 502)
