"""How the engine's cost grows: steps N, caption length, captions per image, images per call, model size.

One process; each curve varies one factor from a base configuration (ViT-B-32, random weights, last
blocks, one image, one 16-token caption, N = 10, float32) and records, per point, the call's CPU time
as a multiple of one plain image forward of the same model (both ``time.process_time`` of this
process, so that other tenants of a busy machine do not count), and the peak resident memory the call
adds (``/proc/self/clear_refs`` resets the peak before each call; the script re-runs itself with
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed blocks leave the resident set). A straight line ``a + b·x`` is
fitted to each numeric curve and printed with its R², with the ratio of the last to the first point.

The grid is subsampled to keep the run to minutes on a busy 2-core machine: N ∈ {1, 2, 5, 10, 20, 50},
caption tokens ∈ {3, 8, 16, 32, 77}, captions per image ∈ {1, 2, 4, 8, 16}, images per call ∈
{1, 2, 4, 8}, models exclip-tiny, ViT-B-32, ViT-B-16, ViT-L-14 (random weights). Each point is the
best of ``--repeats`` calls after a warm-up.

    OMP_NUM_THREADS=1 python bench/cost_curves.py --out bench/results/cost_curves
    OMP_NUM_THREADS=1 python bench/cost_curves.py --curves steps tokens --repeats 1

Writes ``<out>.md`` (the tables), ``<out>.json`` and ``<out>.png`` (cost in image forwards and peak
memory per curve).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch

from attribution.explainer import Explainer
from attribution.models import TINY_MODEL
from testing import random_clip

WORDS = "dog cat red ball grass tree sky blue car road house window street person".split()
BASE_MODEL = "ViT-B-32"
GRID = {  # the numeric curves: a keyword of Model.point and its values
    "steps": [1, 2, 5, 10, 20, 50],
    "tokens": [3, 8, 16, 32, 77],
    "captions": [1, 2, 4, 8, 16],
    "images": [1, 2, 4, 8],
}
MODELS = [TINY_MODEL, "ViT-B-32", "ViT-B-16", "ViT-L-14"]
CURVES = [*GRID, "model"]
LABELS = {
    "steps": "interpolation steps N",
    "tokens": "caption tokens (SOT … EOT)",
    "captions": "distinct captions for one image",
    "images": "distinct images, one caption",
    "model": "model (random weights)",
}


def caption(tokens: int, seed: int = 0) -> str:
    """A caption of exactly ``tokens`` tokens with SOT and EOT (every word is one token)."""
    return " ".join(WORDS[(seed + i) % len(WORDS)] for i in range(tokens - 2))


def _status_gb(field: str) -> float:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(field)) / 1024**2


class Point(TypedDict):
    cpu_s: float
    forward_cpu_s: float
    forwards: float  # cpu_s in image forwards
    added_gb: float


class Row(Point):
    x: int | str  # the curve's value: a number, or the model's name


class _CurveRows(TypedDict):
    rows: list[Row]


class Curve(_CurveRows, total=False):  # (typing.Required is Python 3.11+)
    cost_fit: dict[str, float]  # numeric curves only
    memory_fit: dict[str, float]


def measure(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best CPU seconds over ``repeats`` calls after a warm-up, and the peak memory one call adds (GB)."""
    call()
    before = _status_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts at the current resident set
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return min(times), _status_gb("VmHWM") - before


class Model:
    def __init__(self, name: str) -> None:
        self.name = name
        self.model, self.tokenizer, self.images = random_clip(name, 8)
        with torch.no_grad():
            self.forward = measure(lambda: self.model.encode_image(self.images[:1]), 3)[0]

    def point(
        self, steps: int = 10, tokens: int = 16, captions: int = 1, images: int = 1, repeats: int = 3
    ) -> Point:
        explainer = Explainer(self.model, self.tokenizer, steps=steps)
        pairs = [(i, caption(tokens, c)) for i in range(images) for c in range(captions)]
        batch = self.images[[i for i, _ in pairs]]
        texts = [t for _, t in pairs]
        seconds, added_gb = measure(lambda: explainer.explain(batch, texts), repeats)
        return {
            "cpu_s": seconds,
            "forward_cpu_s": self.forward,
            "forwards": seconds / self.forward,
            "added_gb": added_gb,
        }


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = a + b·x, its R², and the ratio of the last to the first point."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    ratio = ys[-1] / ys[0] if ys[0] else float("nan")
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot, "last_over_first": ratio}


def _row(curve: str, x: int | str, point: Point) -> Row:
    print(f"  {curve}={x}: {point['forwards']:.2f} forwards, +{point['added_gb']:.3f} GB", flush=True)
    return {"x": x, **point}


def _model_curve(base: Model, repeats: int) -> Curve:
    rows = []
    for name in MODELS:
        model = base if name == BASE_MODEL else Model(name)
        rows.append(_row("model", name, model.point(repeats=repeats)))
        del model  # freed before the next one is built
    return {"rows": rows}


def _numeric_curve(base: Model, curve: str, repeats: int) -> Curve:
    rows = [_row(curve, x, base.point(**{curve: x}, repeats=repeats)) for x in GRID[curve]]
    xs = [float(x) for x in GRID[curve]]
    return {
        "rows": rows,
        "cost_fit": fit(xs, [r["forwards"] for r in rows]),
        "memory_fit": fit(xs, [r["added_gb"] for r in rows]),
    }


def run(curves: list[str], repeats: int) -> dict[str, Curve]:
    base = Model(BASE_MODEL)
    return {
        curve: _model_curve(base, repeats) if curve == "model" else _numeric_curve(base, curve, repeats)
        for curve in curves
    }


def markdown(results: dict[str, Curve]) -> str:
    out = []
    for curve, entry in results.items():
        out.append(f"\n**{LABELS[curve]}** (base: {BASE_MODEL}, N = 10, 16 tokens, 1 image, 1 caption)\n")
        out.append(
            f"| {curve} | CPU s | image forward CPU s | cost in image forwards | peak memory added GB |"
        )
        out.append("|---|---:|---:|---:|---:|")
        for r in entry["rows"]:
            out.append(
                f"| {r['x']} | {r['cpu_s']:.3f} | {r['forward_cpu_s']:.3f} | {r['forwards']:.2f} | "
                f"{r['added_gb']:.3f} |"
            )
        for name, f, unit in (
            ("cost", entry.get("cost_fit"), "forwards"),
            ("memory", entry.get("memory_fit"), "GB"),
        ):
            if f is not None:
                out.append(
                    f"\n{name}: {f['a']:.3g} + {f['b']:.3g}·x {unit}, R² = {f['r2']:.3f}, "
                    f"last/first = {f['last_over_first']:.2f}"
                )
    return "\n".join(out)


def plot(results: dict[str, Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (curve, entry) in zip(axes[0], results.items(), strict=True):
        xs = [str(r["x"]) if curve == "model" else r["x"] for r in entry["rows"]]
        ax.plot(xs, [r["forwards"] for r in entry["rows"]], "o-", color="tab:blue")
        ax.set_xlabel(LABELS[curve])
        ax.set_ylabel("cost (image forwards)", color="tab:blue")
        twin = ax.twinx()
        twin.plot(xs, [r["added_gb"] for r in entry["rows"]], "s--", color="tab:red")
        twin.set_ylabel("peak memory added (GB)", color="tab:red")
        ax.set_ylim(bottom=0)
        twin.set_ylim(bottom=0)
        if curve == "model":
            ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("exclip-service engine cost (CPU time / one image forward, same model, same process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Large blocks straight from mmap and back on free: the resident set then follows live memory,
        # so each call's peak is its own and not what earlier, bigger calls left in malloc's free lists.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", nargs="+", choices=CURVES, default=CURVES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cost_curves"))
    args = parser.parse_args()
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    print(header, flush=True)
    results = run(args.curves, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = f"{header}\n{markdown(results)}\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
