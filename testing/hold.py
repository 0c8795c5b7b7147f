"""Holding a worker's batches "running" for as long as a test needs, whatever the machine's speed.

The worker waits before computing a started batch while the file named by its ``EXCLIP_TEST_HOLD_FILE``
exists (``service.worker``). A test passes ``hold.env`` to the worker it starts, sees its job
``running`` (the batch is now held), does what it must while the job runs, then ``release()``s it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from service.worker import TEST_HOLD_FILE_ENV


class WorkerHold:
    """The hold file in ``directory``; engaged (existing) from the start unless ``engaged=False``."""

    def __init__(self, directory: Path, *, engaged: bool = True) -> None:
        self.path = Path(directory) / f"worker-hold-{uuid.uuid4().hex[:8]}"
        if engaged:
            self.engage()

    @property
    def env(self) -> dict[str, str]:
        """The worker's environment variable that points it at this hold."""
        return {TEST_HOLD_FILE_ENV: str(self.path)}

    @property
    def engaged(self) -> bool:
        return self.path.exists()

    def engage(self) -> None:
        """From now on, batches that start wait (those already computing go on)."""
        self.path.touch()

    def release(self) -> None:
        """Held batches compute now, and later ones at once."""
        self.path.unlink(missing_ok=True)
