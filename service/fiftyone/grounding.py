"""How well a run's heatmaps and boxes land on ground-truth boxes: a report over samples.

Per phrase with a ground-truth box of the same label: *pointing* (the heatmap's best cell lies in one
of those boxes) and *energy* (the share of the positive heat whose cells lie in them); the boxes go
through FiftyOne's own ``evaluate_detections`` (IoU matching, per label). Per sample it writes
``{prefix}_pointing`` and ``{prefix}_energy`` (means over its phrases; None without a matching phrase).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Box = Sequence[float]  # x, y, w, h relative to the image, FiftyOne's way


def cell_centres(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The relative x and y of each cell's centre of a map covering the image."""
    rows, cols = shape
    y = (np.arange(rows) + 0.5) / rows
    x = (np.arange(cols) + 0.5) / cols
    return np.meshgrid(x, y)


def in_boxes(x: np.ndarray, y: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    inside = np.zeros(x.shape, dtype=bool)
    for bx, by, bw, bh in boxes:
        inside |= (x >= bx) & (x <= bx + bw) & (y >= by) & (y <= by + bh)
    return inside


def pointing_and_energy(heatmap: np.ndarray, boxes: Sequence[Box]) -> tuple[bool, float]:
    """Whether the best cell lies in ``boxes``, and the share of positive heat that does (0 if none)."""
    x, y = cell_centres(heatmap.shape)
    inside = in_boxes(x, y, boxes)
    best = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    positive = np.clip(heatmap, 0, None)
    total = float(positive.sum())
    return bool(inside[best]), float(positive[inside].sum()) / total if total > 0 else 0.0


def sample_grounding(
    heatmaps: Sequence[np.ndarray | None], texts: Sequence[str], truth: Sequence[tuple[str, Box]]
) -> list[tuple[bool, float]]:
    """Pointing and energy of each phrase that has ground-truth boxes of its label."""
    out = []
    for heatmap, text in zip(heatmaps, texts, strict=True):
        boxes = [box for label, box in truth if label == text]
        if heatmap is not None and boxes:
            out.append(pointing_and_energy(heatmap, boxes))
    return out


def grounding_report(samples: Any, *, prefix: str, gt_field: str, eval_key: str) -> dict[str, Any]:
    """Pointing and energy per sample (written) and overall, and ``evaluate_detections`` of the boxes."""
    import fiftyone as fo  # only here: the functions above work without FiftyOne

    from service.fiftyone.fields import Fields

    schema = samples.get_field_schema()
    fields = Fields(prefix, max_phrases=1)
    for name in (fields.boxes, fields.phrases, gt_field):
        if name not in schema:
            raise ValueError(f"the samples have no field {name!r}: run the explanation first")
    if not eval_key.isidentifier():
        raise ValueError(f"eval_key must be a plain identifier, got {eval_key!r}")
    for name in (f"{prefix}_pointing", f"{prefix}_energy"):
        if name in schema and not isinstance(schema[name], fo.FloatField):
            raise ValueError(f"field {name!r} exists and is not a FloatField: choose another prefix")
        if name not in schema:
            samples._dataset.add_sample_field(name, fo.FloatField)
    results: list[tuple[bool, float]] = []
    for sample in samples.iter_samples(autosave=True, batch_size=16):
        phrases = sample[fields.phrases] or []
        truth = [(d.label, d.bounding_box) for d in (sample[gt_field] or fo.Detections()).detections]
        heatmaps = []
        for phrase in phrases:
            heatmap = sample[phrase["heatmap_field"]] if phrase["heatmap_field"] in schema else None
            heatmaps.append(None if heatmap is None else np.asarray(heatmap.map, dtype=np.float64))
        scored = sample_grounding(heatmaps, [p["text"] for p in phrases], truth)
        sample[f"{prefix}_pointing"] = float(np.mean([p for p, _ in scored])) if scored else None
        sample[f"{prefix}_energy"] = float(np.mean([e for _, e in scored])) if scored else None
        results += scored
    evaluation = samples.evaluate_detections(fields.boxes, gt_field=gt_field, eval_key=eval_key)
    counts = {k: int(sum(samples.values(f"{eval_key}_{k}"))) for k in ("tp", "fp", "fn")}
    return {
        "phrases": len(results),
        "pointing": float(np.mean([p for p, _ in results])) if results else None,
        "energy": float(np.mean([e for _, e in results])) if results else None,
        "detections": counts
        | {"precision": _ratio(counts["tp"], counts["tp"] + counts["fp"])}
        | {"recall": _ratio(counts["tp"], counts["tp"] + counts["fn"])},
        "eval_key": evaluation.key,
    }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None
