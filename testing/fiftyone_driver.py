"""Scenarios the FiftyOne tests and bench run inside the FiftyOne virtualenv: ``SCENARIO 'JSON'``.

Each prints one line of JSON (its answer) last; the tests assert on it. Run by ``FiftyOne.run``
(testing/fiftyone_env.py), which first appends the test environment's site-packages to the path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fiftyone as fo

from attribution.evaluation.scenes import generate_scenes
from service.fiftyone import ServiceUnavailable, explain_samples
from service.fiftyone.fields import Fields


def build(
    name: str, directory: str, n: int, seed: int, image_size: int = 64, n_objects: int | None = None
) -> dict[str, Any]:
    """A dataset of generated scenes: caption, phrases (the objects' phrases) and ground-truth boxes."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    dataset = fo.Dataset(name, overwrite=True, persistent=True)
    samples = []
    for i, scene in enumerate(generate_scenes(n, seed, image_size=image_size, n_objects=n_objects)):
        path = root / f"scene-{i:03d}.png"
        scene.image.save(path)
        boxes = [
            fo.Detection(
                label=scene.phrase(j),
                bounding_box=[
                    x0 / image_size,
                    y0 / image_size,
                    (x1 - x0) / image_size,
                    (y1 - y0) / image_size,
                ],
            )
            for j, (x0, y0, x1, y1) in enumerate(o.box for o in scene.objects)
        ]
        samples.append(
            fo.Sample(
                filepath=str(path),
                caption=scene.caption,
                phrases=[scene.phrase(j) for j in range(len(scene.objects))],
                ground_truth=fo.Detections(detections=boxes),
            )
        )
    dataset.add_samples(samples)
    return {"ids": dataset.values("id")}


def add_samples(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Add samples given as plain field values (bad input for the tests)."""
    dataset = fo.load_dataset(name)
    ids = dataset.add_samples([fo.Sample(**values) for values in samples])
    return {"ids": [str(i) for i in ids]}


def add_field(name: str, field: str, kind: str) -> dict[str, Any]:
    dataset = fo.load_dataset(name)
    dataset.add_sample_field(field, getattr(fo, kind))
    return {}


def explain(name: str, kill_pid_after: list[int] | None = None, **arguments: Any) -> dict[str, Any]:
    """``explain_samples`` on the dataset; ``kill_pid_after=[pid, n]``: SIGKILL ``pid`` once ``n``
    samples are finished (a service that vanishes mid-run). Answers the summary or the error."""
    progress: Any = False
    if kill_pid_after:
        pid, after = kill_pid_after

        def progress(finished: int, total: int) -> None:
            if finished >= after:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    started = time.monotonic()
    try:
        summary = explain_samples(fo.load_dataset(name), progress=progress, **arguments)
    except (ValueError, ServiceUnavailable) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"summary": asdict(summary), "seconds": time.monotonic() - started}


def dump(name: str, prefix: str = "exclip", max_phrases: int = 16) -> dict[str, Any]:
    """Every sample's written fields, as plain JSON (heatmaps as nested lists)."""
    dataset = fo.load_dataset(name)
    fields = Fields(prefix, max_phrases)
    schema = dataset.get_field_schema()
    out = []
    for sample in dataset.iter_samples():
        heatmaps = []
        for i in range(max_phrases):
            heatmap = sample[fields.heatmap(i)] if fields.heatmap(i) in schema else None
            heatmaps.append(
                None if heatmap is None else {"map": heatmap.map.tolist(), "range": heatmap.range}
            )
        boxes = sample[fields.boxes] if fields.boxes in schema else None
        phrases = sample[fields.phrases] if fields.phrases in schema else None
        completeness = sample[fields.completeness] if fields.completeness in schema else None
        out.append(
            {
                "id": sample.id,
                "filepath": sample.filepath,
                "last_modified_at": sample.last_modified_at.isoformat(),
                "ground_truth": [
                    {"label": d.label, "box": d.bounding_box}
                    for d in (sample["ground_truth"] or fo.Detections()).detections
                ]
                if "ground_truth" in schema
                else [],
                "heatmaps": heatmaps,
                "boxes": None
                if boxes is None
                else [
                    {
                        "label": d.label,
                        "box": d.bounding_box,
                        "confidence": d.confidence,
                        "method": d["method"],
                        "phrase_index": d["phrase_index"],
                    }
                    for d in boxes.detections
                ],
                "phrases": None if phrases is None else [p.to_dict() for p in phrases],
                "score": sample[fields.score] if fields.score in schema else None,
                "completeness": None if completeness is None else completeness.to_dict(),
                "caption": sample[fields.caption] if fields.caption in schema else None,
                "error": sample[fields.error] if fields.error in schema else None,
            }
        )
    return {"samples": out, "schema": {k: str(v) for k, v in schema.items()}}


def operator(
    name: str, uri: str, params: dict[str, Any], select: int = 0, limit: int | None = None
) -> dict[str, Any]:
    """``execute_operator`` on the dataset (its first ``limit`` samples; the first ``select`` of them
    selected), as a script runs an App operator headless; answers its result or its error."""
    import fiftyone.operators as foo

    dataset = fo.load_dataset(name)
    view = dataset.limit(limit) if limit else dataset.view()
    selected = view.limit(select).values("id") if select else []
    executed = foo.execute_operator(uri, ctx={"view": view, "selected": selected, "params": params})
    return {"result": executed.result, "error": executed.error, "selected": selected}


def search_query(query: str) -> dict[str, Any]:
    """The query the text-search operator reads off a ``sort_by_similarity`` view."""
    import fiftyone.core.stages as fos

    from service.fiftyone.plugin import search_query as read_query

    stages = [fos.Limit(3), fos.SortBySimilarity(query, brain_key="clip_sim"), fos.Limit(2)]
    return {"query": read_query(SimpleNamespace(_stages=stages))}


def show(name: str, paths: list[str]) -> dict[str, Any]:
    """Make ``paths`` the fields the App shows (its sidebar checkboxes) for the dataset."""
    dataset = fo.load_dataset(name)
    dataset.app_config.active_fields = fo.ActiveFields(paths=paths)
    dataset.save()
    return {"colorscales": dataset.app_config.color_scheme.colorscales}


def steps(steps: list[list[Any]]) -> list[Any]:
    """Several scenarios in one process (FiftyOne and torch are imported once): ``[[name, args], ...]``."""
    return [SCENARIOS[name](**arguments) for name, arguments in steps]


SCENARIOS = {
    f.__name__: f for f in (build, add_samples, add_field, explain, dump, operator, search_query, show, steps)
}

if __name__ == "__main__":
    answer = SCENARIOS[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(answer, default=str))
