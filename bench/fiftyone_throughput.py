"""Samples per second through the FiftyOne integration vs the service alone, same service, same inputs.

The embedded service with the demo model (``exclip-scenes``, or ``--model``/``--pretrained``)
explains generated scenes (caption, one span per object). "service alone": the project's
``AsyncClient`` sends them straight from memory, ``--concurrency`` at a time. "explain_samples": the
same scenes as a FiftyOne dataset (real FiftyOne 1.22.1 and MongoDB 6.0.5 from the tests' cached
virtualenv, ``testing.fiftyone_env``), explained with ``explain_samples`` at the same concurrency,
which also reads each file, checks it, converts the result to heatmaps and boxes and saves each
sample. Both are timed after a warm-up.

    python bench/fiftyone_throughput.py --samples 48 --concurrency 1 4
    python bench/fiftyone_throughput.py --samples 16 --concurrency 1 4 --model ViT-B-32 --pretrained none
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from attribution.evaluation.scenes import Scene, generate_scenes
from service.client import AsyncClient, Span
from testing import ServiceLauncher
from testing.fiftyone_env import FiftyOne, Mongo, ensure_installation

SEED = 9_100_001


async def service_alone(url: str, scenes: list[Scene], concurrency: int) -> float:
    """Seconds to explain every scene through the client, ``concurrency`` requests at a time."""
    images = []
    for scene in scenes:
        path = Path(tempfile.mkstemp(suffix=".png")[1])
        scene.image.save(path)
        images.append(path.read_bytes())
        path.unlink()
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(url) as client:

        async def one(scene: Scene, image: bytes) -> None:
            async with gate:
                spans = [Span(*o.span) for o in scene.objects]
                await client.explain(image, [(scene.caption, spans)])

        started = time.monotonic()
        await asyncio.gather(*(one(s, i) for s, i in zip(scenes, images, strict=True)))
        return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model", default="exclip-scenes", help="the served model (exclip-scenes)")
    parser.add_argument("--pretrained", default="scenes", help="its weights: a tag, a file or none")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="exclip-fo-bench-"))
    launcher = ServiceLauncher(None, f"b{uuid.uuid4().hex[:8]}", "scenes", work)
    venv = ensure_installation()
    (work / "db").mkdir()
    mongo = Mongo(venv, work / "db")
    try:
        service = launcher.embedded(EXCLIP_MODEL=args.model, EXCLIP_PRETRAINED=args.pretrained).wait_ready()
        url = service.url
        assert url is not None  # wait_ready returns once the service answers on its URL
        fiftyone = FiftyOne(venv, mongo, work)
        scenes = generate_scenes(args.samples, SEED)
        asyncio.run(service_alone(url, scenes[:4], 2))  # warm-up
        rows = []
        for concurrency in args.concurrency:
            alone = asyncio.run(service_alone(url, scenes, concurrency))
            name = f"bench{concurrency}"
            build = {"name": name, "directory": str(work / name), "n": args.samples, "seed": SEED}
            explain = {"name": name, "url": service.url, "caption_field": "caption"}
            explain |= {"phrases_field": "phrases", "concurrency": concurrency}
            _, answer = fiftyone.run("steps", timeout_s=3600, steps=[["build", build], ["explain", explain]])
            assert answer["summary"]["explained"] == args.samples, answer
            rows.append((concurrency, alone, answer["seconds"]))
    finally:
        launcher.close()
        mongo.stop()
    print(
        f"{args.samples} scenes (64 x 64, 1-3 phrases each), {args.model} ({args.pretrained}), "
        "embedded service, CPU\n"
    )
    print("| concurrency | service alone (samples/s) | explain_samples (samples/s) | integration overhead |")
    print("|---|---|---|---|")
    for concurrency, alone, integrated in rows:
        overhead = 100 * (integrated - alone) / alone
        print(
            f"| {concurrency} | {args.samples / alone:.2f} | {args.samples / integrated:.2f} | "
            f"{overhead:+.0f}% time |"
        )


if __name__ == "__main__":
    main()
