"""The engine next to the authors' reference (exclip 1.1), side by side in one run, on the same inputs.

Each measurement runs in its own process so that its peak resident memory is its own. The engine's
time is the best of five calls; the reference (minutes per call) runs once. Models have
random weights (seeded, identical in every process); the caption has 16 tokens; N = 10; layers 11/11.

    python bench/engine_vs_reference.py                      # ViT-B-32 and ViT-B-16, reference included
    python bench/engine_vs_reference.py --models ViT-B-32 --no-reference

Prints a markdown table: wall time, peak RSS (and peak GPU memory on CUDA), the time as a multiple of
one plain image forward pass measured in the same process (a yardstick that survives a busy machine),
the speed-up, the max relative error against the reference, and the throughput of 8 captions × 4
images in one call (measured in a process of its own, so it does not raise the single call's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

CAPTION = "a photo of a brown dog with a red ball on the green grass"  # 16 tokens with SOT, EOT
CAPTIONS = [
    "a dog on the grass",
    "a red ball",
    "two cats sleeping on a sofa",
    "a man riding a bicycle down a street",
    "a bowl of fruit on a wooden table",
    "a city skyline at night",
    "a child flying a kite on the beach",
    "an old car parked in front of a house",
]


class Row(TypedDict, total=False):
    """One measurement, as a child prints it (JSON) and the table reads it."""

    seconds: float
    forward: float  # one plain image forward in the same process
    baseline_gb: float  # resident memory before the call
    gpu_peak_gb: float
    pairs_per_second: float
    peak_rss_gb: float
    error: str  # in place of the numbers when the measurement failed


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _rss_gb() -> float:
    """Resident memory now (Linux), to separate the loaded model from what an explanation adds."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return kib / 1024**2


def _setup(model_name: str, device: str):
    from testing import random_clip  # the child runs with the repository root on PYTHONPATH

    model, tokenizer, image = random_clip(model_name, 1, device)
    assert len(tokenizer.encode(CAPTION)) + 2 == 16
    return model, tokenizer, image


def _forward_seconds(model, image, repeats: int = 5) -> float:
    """The fastest of a few plain image forward passes: the yardstick for this process's speed."""
    import torch

    times = []
    with torch.no_grad():
        model.encode_image(image)
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_image(image)
            _sync(image.device)
            times.append(time.perf_counter() - start)
    return min(times)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(model_name: str, device: str, out: Path) -> Row:
    import torch

    from attribution.explainer import Explainer

    model, tokenizer, image = _setup(model_name, device)
    forward = _forward_seconds(model, image)
    baseline = _rss_gb()
    explainer = Explainer(model, tokenizer, 11, 11, 10)
    explainer.explain(image, [CAPTION])  # warm-up: reference states cached per model, as in the service
    if image.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):  # best of five: the machine's other tenants only ever add time
        start = time.perf_counter()
        result = explainer.explain(image, [CAPTION])[0]
        _sync(image.device)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    torch.save(result.interactions.cpu(), out)
    row: Row = {"seconds": seconds, "forward": forward, "baseline_gb": baseline}
    if image.device.type == "cuda":
        row["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return row


def run_throughput(model_name: str, device: str) -> Row:
    """8 captions × 4 images in one call (after a warm-up call), in pairs per second."""
    import torch

    from attribution.explainer import Explainer

    model, tokenizer, image = _setup(model_name, device)
    explainer = Explainer(model, tokenizer, 11, 11, 10)
    explainer.explain(image, [CAPTION])
    images = torch.randn(4, 3, *image.shape[-2:], generator=torch.Generator().manual_seed(2)).to(device)
    pairs = [(i, c) for i in range(4) for c in CAPTIONS]
    start = time.perf_counter()
    explainer.explain(torch.stack([images[i] for i, _ in pairs]), [c for _, c in pairs])
    _sync(image.device)
    return {"pairs_per_second": len(pairs) / (time.perf_counter() - start)}


def run_reference(model_name: str, device: str, out: Path) -> Row:
    import torch
    from exclip.explanation import OpenClipExplainer

    model, tokenizer, image = _setup(model_name, device)
    forward = _forward_seconds(model, image)
    baseline = _rss_gb()
    explainer = OpenClipExplainer(model, image_dim=image.shape[-1], device=torch.device(device))
    start = time.perf_counter()
    interactions = explainer.explain(
        tokenizer([CAPTION]).to(device), image, text_layer=11, image_layer=11, N=10
    )
    _sync(image.device)
    seconds = time.perf_counter() - start
    torch.save(interactions.cpu(), out)
    row: Row = {"seconds": seconds, "forward": forward, "baseline_gb": baseline}
    if image.device.type == "cuda":
        row["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return row


def _child(args) -> None:
    """One measurement in this process; prints one JSON line."""
    try:
        if args.child == "ours":
            row = run_ours(args.model, args.device, Path(args.out))
        elif args.child == "throughput":
            row = run_throughput(args.model, args.device)
        else:
            row = run_reference(args.model, args.device, Path(args.out))
    except MemoryError as exc:
        row = {"error": f"out of memory ({exc.__class__.__name__})"}
    except RuntimeError as exc:
        if "memory" not in str(exc).lower() and "alloc" not in str(exc).lower():
            raise
        row = {"error": f"out of memory: {str(exc).splitlines()[0][:120]}"}
    row["peak_rss_gb"] = _peak_rss_gb()
    print(json.dumps(row), flush=True)


def _measure(kind: str, model: str, device: str, out: Path, memory_limit_gb: float | None = None) -> Row:
    cmd = [sys.executable, __file__, "--child", kind, "--model", model, "--device", device, "--out", str(out)]

    # An address-space cap turns a runaway allocation into a MemoryError, not a dead machine.
    def limit() -> None:
        if memory_limit_gb:
            cap = int(memory_limit_gb * 1024**3)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": f"failed: {tail[0][:160]}"}
    row: Row = json.loads(lines[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--reference-memory-gb",
        type=float,
        default=20.0,
        help="address-space cap for the reference process (it needs > 24 GB for ViT-B-16)",
    )
    parser.add_argument("--child", choices=["ours", "reference", "throughput"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"device {args.device}, {os.cpu_count()} CPUs"
    )
    print(
        "| model | implementation | seconds | image forwards | peak RSS GB | added by the call GB | "
        "peak GPU GB | speed-up | max rel. error | pairs/s (8×4) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            ours_out, ref_out = Path(tmp, f"{model}-ours.pt"), Path(tmp, f"{model}-ref.pt")
            ours = _measure("ours", model, args.device, ours_out)
            ref: Row = (
                {"error": "not run"}
                if args.no_reference
                else _measure("reference", model, args.device, ref_out, args.reference_memory_gb)
            )
            throughput = _measure("throughput", model, args.device, ours_out)
            ours["pairs_per_second"] = throughput.get("pairs_per_second", float("nan"))
            error = speedup = ""
            if "error" not in ours and "error" not in ref:
                a, b = torch.load(ours_out), torch.load(ref_out)
                error = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
                in_forwards = (ref["seconds"] / ref["forward"]) / (ours["seconds"] / ours["forward"])
                speedup = f"{ref['seconds'] / ours['seconds']:.0f}× ({in_forwards:.0f}× in forwards)"
            for name, row in (("exclip 1.1 (reference)", ref), ("attribution (this)", ours)):
                if "error" in row:
                    peak = f"{row['peak_rss_gb']:.1f}" if "peak_rss_gb" in row else ""
                    print(f"| {model} | {name} | {row['error']} |  | {peak} |  |  |  |  |  |")
                    continue
                print(
                    f"| {model} | {name} | {row['seconds']:.2f} | {row['seconds'] / row['forward']:.1f} | "
                    f"{row['peak_rss_gb']:.2f} | {row['peak_rss_gb'] - row['baseline_gb']:.2f} | "
                    f"{row.get('gpu_peak_gb', float('nan')):.2f} | "
                    f"{speedup if row is ours else ''} | {error if row is ours else ''} | "
                    f"{row.get('pairs_per_second', float('nan')):.1f} |"
                )


if __name__ == "__main__":
    main()
