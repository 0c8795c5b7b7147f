"""The whole accelerator check in one run: engine vs reference, throughput, peak memory, the service.

Written to be run once, unattended, when a GPU is available for a few minutes (and on CPU in CI, so it
cannot rot). Sections, each a markdown table (and all of it as JSON with ``--json``):

1. **Equivalence**: the engine against the authors' reference (``exclip`` 1.1) on the device, for
   ViT-B-32 and ViT-B-16 (random weights, seed 0, a 16-token caption, N = 10, last blocks): max
   relative error, seconds, and both as image forwards of the same model measured in the same run.
   The reference runs in IEEE float32 (TF32 off); the engine as shipped (TF32 off inside its calls,
   ``attribution/tf32.py``), and once more with TF32 on for every float32 product and convolution
   (``max_rel_error_tf32``: what the guard prevents; on CPU TF32 does not exist and it equals the first).
   No address-space cap is set anywhere here: ``RLIMIT_AS`` breaks CUDA initialisation.
2. **Throughput** in float32 and bfloat16: 64 distinct (image, caption) pairs in one call, and
   8 images × 8 captions (64 pairs sharing sides), pairs per second and peak memory (GPU allocator
   peak on CUDA, resident-set peak on CPU).
3. **Service**, embedded mode (API and worker thread in one process, no Redis), 16 concurrent clients
   posting ``/explain`` with batching on (``EXCLIP_MAX_BATCH=8``) and off (``=1``): requests per
   second, client latency p50/p95, failures.

    python bench/gpu_check.py --device cuda --json gpu.json      # ViT-B-32 and ViT-B-16, a few minutes
    python bench/gpu_check.py --device cpu --quick               # exclip-tiny, small counts (CI)

``--quick`` uses the tiny test model, N = 3, 8 pairs / 2 × 4 and 32 service requests. On a GPU
machine without internet, install the service's packages first (fastapi, uvicorn, open_clip_torch, …).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from exclip.explanation import OpenClipExplainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402 - the bench's images and percentiles
from service_throughput import BATCHING, WAIT_S, drive  # noqa: E402 - its client driver and modes

from attribution import tf32  # noqa: E402
from attribution.explainer import PRECISIONS, Explainer  # noqa: E402
from attribution.memory import tangent_budget  # noqa: E402
from attribution.models import TINY_MODEL  # noqa: E402 - importing registers exclip-tiny
from testing import Process, free_port, random_clip  # noqa: E402

CAPTION = "a photo of a brown dog with a red ball on the green grass"  # 16 tokens with SOT, EOT
CAPTIONS = [
    "a dog on the grass",
    "a red ball",
    "two cats sleeping on a sofa",
    "a man riding a bicycle",
    "a bowl of fruit on a wooden table",
    "a city skyline at night",
    "a child flying a kite",
    "an old car parked in front of a house",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    models: list[str]
    steps: int
    distinct_pairs: int
    grid: tuple[int, int]  # images × captions
    service_model: str
    service_requests: int
    service_steps: int
    clients: int = 16


FULL = Plan(["ViT-B-32", "ViT-B-16"], 10, 64, (8, 8), "ViT-B-32", 128, 10)
QUICK = Plan([TINY_MODEL], 3, 8, (2, 4), TINY_MODEL, 32, 2)


class Memory:
    """Peak memory of this process during a block: the CUDA allocator's, or the resident set's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.peak_gb = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gb = torch.cuda.max_memory_allocated() / 1024**3
        else:
            status = Path("/proc/self/status").read_text().splitlines()
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
            self.peak_gb = kib / 1024**2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], T], device: torch.device) -> tuple[float, T]:
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    return time.perf_counter() - start, out


def forward_seconds(encode_image: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> float:
    with torch.no_grad():
        encode_image(image)
        return min(timed(lambda: encode_image(image), image.device)[0] for _ in range(5))


@contextlib.contextmanager
def tf32_inside_the_engine() -> Iterator[None]:
    """The engine's float32 guard set to TF32 instead of IEEE float32, for one measurement."""
    exact, tf32.IEEE = tf32.IEEE, "tf32"
    try:
        yield
    finally:
        tf32.IEEE = exact


def equivalence(name: str, plan: Plan, device: torch.device) -> dict:
    model, tokenizer, images = random_clip(name, 64, str(device))
    image = images[:1]
    forward = forward_seconds(model.encode_image, image)
    reference = OpenClipExplainer(model, image_dim=image.shape[-1], device=device)
    layer = len(model.visual.transformer.resblocks) - 1
    tokens = tokenizer([CAPTION]).to(device)
    with Memory(device) as ref_memory, tf32.exact_float32():
        ref_seconds, expected = timed(
            lambda: reference.explain(tokens, image, text_layer=layer, image_layer=layer, N=plan.steps),
            device,
        )
    reference.reset_attribution()  # the reference leaves hooks on the model
    explainer = Explainer(model, tokenizer, steps=plan.steps)
    explainer.explain(image, [CAPTION])  # warm-up: the references' hidden states are cached per model
    with Memory(device) as memory:
        seconds = min(timed(lambda: explainer.explain(image, [CAPTION]), device)[0] for _ in range(3))
    result = explainer.explain(image, [CAPTION])[0].interactions.cpu()
    error = float((result - expected.cpu()).abs().max() / expected.abs().max())
    with tf32_inside_the_engine():
        with_tf32 = explainer.explain(image, [CAPTION])[0].interactions.cpu()
    error_tf32 = float((with_tf32 - expected.cpu()).abs().max() / expected.abs().max())
    return {
        "model": name,
        "max_rel_error": error,
        "max_rel_error_tf32": error_tf32,
        "seconds": seconds,
        "forwards": seconds / forward,
        "reference_seconds": ref_seconds,
        "reference_forwards": ref_seconds / forward,
        "peak_gb": memory.peak_gb,
        "reference_peak_gb": ref_memory.peak_gb,
    }


def throughput(name: str, plan: Plan, device: torch.device) -> list[dict]:
    model, tokenizer, images = random_clip(name, 64, str(device))
    n_img, n_cap = plan.grid
    distinct = (
        images[: plan.distinct_pairs],
        [CAPTIONS[i % 8] + f" number {i}" for i in range(plan.distinct_pairs)],
    )
    grid_pairs = [(i, c) for i in range(n_img) for c in range(n_cap)]
    shared = (images[[i for i, _ in grid_pairs]], [CAPTIONS[c] for _, c in grid_pairs])
    rows = []
    for precision in ("float32", "bfloat16"):
        explainer = Explainer(model, tokenizer, steps=plan.steps, precision=precision)
        explainer.explain(images[:1], [CAPTION])  # warm-up
        for label, (batch, captions) in (("distinct", distinct), (f"{n_img}x{n_cap}", shared)):
            with Memory(device) as memory:
                seconds, _ = timed(functools.partial(explainer.explain, batch, captions), device)
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "pairs": label,
                    "n_pairs": len(captions),
                    "seconds": seconds,
                    "pairs_per_s": len(captions) / seconds,
                    "peak_gb": memory.peak_gb,
                    # the pass size the engine chose from the free memory (attribution/memory.py)
                    "max_tangents": tangent_budget(explainer.mlp_width, device, PRECISIONS[precision]),
                }
            )
    return rows


def service(plan: Plan, device: torch.device, log_dir: Path) -> list[dict]:
    """The service in embedded mode (no Redis) under ``plan.clients`` concurrent clients."""
    images = common.images()
    rows = []
    for batching, extra in BATCHING.items():
        env = {
            **os.environ,
            "EXCLIP_MODEL": plan.service_model,
            "EXCLIP_PRETRAINED": "none",
            "EXCLIP_DEVICE": device.type,
            "EXCLIP_WAIT_MAX_S": str(WAIT_S),
            "EXCLIP_MAX_WAIT_MS": "20",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra,
        }
        env.pop("REDIS_URL", None)  # embedded mode
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        argv = [*common.service_command(), *args]
        api = Process(args, env, log_dir, port, argv=argv, name=f"embedded-{batching}", new_session=True)
        try:
            api.wait_ready(timeout_s=300)  # the in-process worker has loaded the model
            asyncio.run(drive(url, plan.clients, plan.clients, plan.service_steps, images, None, 1000))
            latencies, failures, _, seconds = asyncio.run(
                drive(url, plan.service_requests, plan.clients, plan.service_steps, images, None)
            )
        finally:
            api.stop(timeout_s=20)
        latencies.sort()
        rows.append(
            {
                "model": plan.service_model,
                "batching": batching,
                "clients": plan.clients,
                "requests": plan.service_requests,
                "ok": len(latencies),
                "failures": len(failures),
                "failure_examples": failures[:3],
                "req_per_s": len(latencies) / seconds,
                "p50_ms": common.percentile(latencies, 0.5) * 1000,
                "p95_ms": common.percentile(latencies, 0.95) * 1000,
            }
        )
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--quick", action="store_true", help="tiny model and small counts (CI)")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--skip", nargs="*", default=[], choices=["equivalence", "throughput", "service"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device)
    plan = QUICK if args.quick else FULL
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    header = (
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}, torch {torch.__version__}, "
        f"plan {'quick' if args.quick else 'full'}: {asdict(plan)}"
    )
    print(header, flush=True)
    out: dict = {"header": header, "equivalence": [], "throughput": [], "service": []}
    if "equivalence" not in args.skip:
        out["equivalence"] = [equivalence(m, plan, device) for m in plan.models]
        print(
            table(
                out["equivalence"],
                [
                    "model",
                    "max_rel_error",
                    "max_rel_error_tf32",
                    "seconds",
                    "forwards",
                    "reference_seconds",
                    "reference_forwards",
                    "peak_gb",
                    "reference_peak_gb",
                ],
            ),
            flush=True,
        )
    if "throughput" not in args.skip:
        out["throughput"] = [row for m in plan.models for row in throughput(m, plan, device)]
        print(
            table(
                out["throughput"],
                [
                    *("model", "precision", "pairs", "n_pairs", "seconds"),
                    *("pairs_per_s", "peak_gb", "max_tangents"),
                ],
            ),
            flush=True,
        )
    if "service" not in args.skip:
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_logs_{os.getpid()}"
        log_dir.mkdir(parents=True, exist_ok=True)
        out["service"] = service(plan, device, log_dir)
        print(
            table(
                out["service"],
                [
                    "model",
                    "batching",
                    "clients",
                    "requests",
                    "ok",
                    "failures",
                    "req_per_s",
                    "p50_ms",
                    "p95_ms",
                ],
            ),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    failed = [r for r in out["service"] if r["failures"]] + [
        r for r in out["equivalence"] if r["max_rel_error"] > 1e-4
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
