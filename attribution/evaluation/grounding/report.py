"""Presenting a benchmark result: Markdown tables, the JSON file, and a figure of examples."""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from attribution.evaluation.grounding.benchmark import BenchmarkResult, Layers, layers_label
from attribution.evaluation.grounding.errors import AnnotationError, PlottingUnavailable
from attribution.evaluation.grounding.files import read_json as read_json_file
from attribution.evaluation.grounding.methods import Batch
from attribution.evaluation.grounding.metrics import argmax_patch

MAX_GROUP_COLUMNS = 10  # more groups (COCO categories) are in the JSON; the table shows the largest


def _row_keys(result: BenchmarkResult) -> list[tuple[str, Layers]]:
    """(method, layers) runs: methods in order of first appearance, each method's layers sorted."""
    methods = list(dict.fromkeys(s.method for s in result.scores))
    keys = {(s.method, s.layers) for s in result.scores}
    return sorted(keys, key=lambda k: (methods.index(k[0]), tuple(-1 if v is None else v for v in k[1])))


def metric_table(result: BenchmarkResult, metric: str) -> str:
    """Markdown: one row per method and layers (text/image; ``-`` = not read), one column per group."""
    groups = result.groups(MAX_GROUP_COLUMNS)
    if len(groups) > MAX_GROUP_COLUMNS + 1:
        groups = groups[:MAX_GROUP_COLUMNS] + groups[-1:]
    cells = {(s.method, s.layers, s.group): s for s in result.summaries()}
    counts = {g: cells[next(iter(_row_keys(result))) + (g,)].phrases for g in groups}
    header = ["method", "layers t/i"] + [f"{g} (n={counts[g]})" for g in groups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, layers in _row_keys(result):
        values = [cells.get((method, layers, g)) for g in groups]
        numbers = ["" if v is None else f"{getattr(v, metric):.3f}" for v in values]
        row = [method, layers_label(layers), *numbers]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cost_table(result: BenchmarkResult) -> str:
    """Markdown: seconds and image forwards per caption, per method and layers."""
    lines = [
        "| method | layers t/i | s per caption | image forwards per caption | phrases per caption "
        "| one image forward, ms |",
        "|---|---|---|---|---|---|",
    ]
    order = {key: i for i, key in enumerate(_row_keys(result))}
    for c in sorted(result.costs, key=lambda c: order.get((c.method, c.layers), len(order))):
        lines.append(
            f"| {c.method} | {layers_label(c.layers)} | {c.per_caption_s:.4f} | {c.per_caption_forwards:.1f} "
            f"| {c.phrases / max(c.captions, 1):.2f} | {c.image_forward_s * 1000:.2f} |"
        )
    return "\n".join(lines)


def text_report(result: BenchmarkResult) -> str:
    return "\n\n".join(
        [
            f"Pointing game ({result.pointing_rule} rule), share of phrases hit:",
            metric_table(result, "pointing"),
            "Energy in box (share of positive heatmap mass inside the box), mean over phrases:",
            metric_table(result, "energy"),
            "Cost:",
            cost_table(result),
        ]
    )


def write_json(result: BenchmarkResult, path: str | Path, config: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"config": config, **result.to_dict()}, indent=1))


def read_json(path: str | Path) -> tuple[dict[str, Any], BenchmarkResult]:
    """The configuration and result of a file written by ``write_json``."""
    data = read_json_file(path, "result file")
    try:
        return data["config"], BenchmarkResult.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise AnnotationError(f"{path} is not a result file of the benchmark: {type(e).__name__}: {e}") from e


def require_matplotlib() -> None:
    """Raise a clear error, before any work, when the figure cannot be drawn (matplotlib is optional)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlottingUnavailable(
            "a figure needs matplotlib: pip install 'exclip-service[evaluation]' (or leave out --figure)"
        )


def plot_examples(
    result: BenchmarkResult,
    batch: Batch,
    columns: Sequence[tuple[str, Layers]],
    path: str | Path,
    max_rows: int = 8,
    dpi: int = 90,
) -> None:
    """PNG grid: per example phrase, the image with its boxes, then each method's heatmap over it.

    Heatmaps are drawn signed (red positive, blue negative, each map scaled to its own largest
    magnitude) over the part of the image the model sees; x marks the highest patch.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    # (sample index, phrase index): one phrase per sample, cycling through the phrases
    picks: list[tuple[int, int]] = []
    for i, sample in enumerate(batch.samples):
        if sample.phrases and len(picks) < max_rows:
            picks.append((i, i % len(sample.phrases)))
    columns = [c for c in columns if c in result.examples]
    size = (1.6 * (1 + len(columns)), 1.7 * len(picks))
    fig, axes = plt.subplots(len(picks), 1 + len(columns), figsize=size, squeeze=False)
    for row, (i, p) in enumerate(picks):
        sample, image, geometry = batch.samples[i], batch.images[i], batch.geometries[i]
        x0, y0, x1, y1 = geometry.crop_box
        for col in range(1 + len(columns)):
            ax = axes[row][col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            for bx0, by0, bx1, by1 in sample.phrases[p].boxes:
                ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, color="lime", lw=1.2))
            if col == 0:
                ax.set_title(f'"{sample.phrase_text(p)}"', fontsize=7)
                ax.set_ylabel(
                    sample.caption if len(sample.caption) < 40 else sample.caption[:37] + "…", fontsize=5
                )
                continue
            method, layers = columns[col - 1]
            heatmap = result.examples[(method, layers)][i][p]
            limit = float(heatmap.abs().max()) or 1.0
            ax.imshow(
                heatmap.numpy(),
                cmap="bwr",
                vmin=-limit,
                vmax=limit,
                alpha=0.6,
                extent=(x0, x1, y1, y0),
                interpolation="nearest",
            )
            r, c = argmax_patch(heatmap)
            px0, py0, px1, py1 = geometry.patch_box(r, c)
            ax.plot([(px0 + px1) / 2], [(py0 + py1) / 2], marker="x", color="black", markersize=5)
            ax.set_xlim(0, geometry.width)
            ax.set_ylim(geometry.height, 0)
            if row == 0:
                ax.set_title(f"{method}\n{layers_label(layers)}", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    # A 256-colour palette keeps the figure small enough to commit (noisy scenes compress badly).
    Image.open(buffer).convert("RGB").quantize(256).save(path, format="PNG", optimize=True)
