"""FiftyOne integration: explain a dataset's samples with the service and see the maps in the App.

    from service.fiftyone import explain_samples

    explain_samples(dataset, url="http://127.0.0.1:8000", caption_field="caption")

``explain_samples`` (service.fiftyone.explain) writes per sample and phrase a signed heatmap, its box and
the tokens' scores (service.fiftyone.fields); phrases come from service.fiftyone.phrases. The App
plugin (operators) is in service/fiftyone/plugin/. FiftyOne itself is not a dependency of the service:
install it where you run this. Importing this package does not import FiftyOne (``labels`` and
``phrases`` work without it); the names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunSummary", "ServiceUnavailable", "explain_samples"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from service.fiftyone import explain

        return getattr(explain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
