"""What ``/setup`` told this API process about each Label Studio project.

Label Studio calls ``/setup`` when a backend is connected and again before every batch of
predictions, so the batch path always finds its project here; an interactive request may reach a
replica that has not seen ``/setup`` and then uses the settings (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, default thresholds). The table is bounded: the oldest project is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_PROJECTS = 1000


@dataclass(frozen=True)
class ProjectSetup:
    hostname: str | None
    access_token: str | None
    extra_params: dict[str, Any] | None


class Projects:
    def __init__(self, capacity: int = MAX_PROJECTS) -> None:
        self.capacity = capacity
        self._setups: OrderedDict[str, ProjectSetup] = OrderedDict()

    @staticmethod
    def key(project: str | int | None) -> str:
        """Label Studio names a project ``"<id>.<created timestamp>"``; the id alone is enough here."""
        return str(project or "").split(".", 1)[0]

    def remember(self, project: str, setup: ProjectSetup) -> None:
        key = self.key(project)
        self._setups.pop(key, None)
        self._setups[key] = setup
        while len(self._setups) > self.capacity:
            self._setups.popitem(last=False)

    def get(self, project: str | int | None) -> ProjectSetup | None:
        return self._setups.get(self.key(project))
