"""Peak memory of ``explain_samples`` against the dataset's size: bounded by the concurrency, not the samples.

For each dataset size, generated scenes (``--image-size`` pixels, PNG files of tens of kilobytes each) are
added to a FiftyOne dataset (real FiftyOne 1.22.1 and MongoDB 6.0.5 from the tests' cached virtualenv) and
explained through the embedded demo service at ``--concurrency``; the driver process that runs
``explain_samples`` is measured by ``/usr/bin/time -v`` (its maximum resident set size). Were the files,
results or samples of the whole run held, the peak would grow with the dataset by about its size on disk.

    python bench/fiftyone_memory.py                       # 48 and 384 samples of 384 px, concurrency 4
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from testing import ROOT, ServiceLauncher
from testing.fiftyone_env import DRIVER, FiftyOne, Mongo, bootstrap, ensure_installation

SEED = 9_200_001


def peak_rss_mb(fiftyone: FiftyOne, scenario: str, arguments: Mapping[str, object]) -> tuple[float, object]:
    """The driver's answer to ``scenario`` and its peak resident set size in MiB."""
    python = str(fiftyone.venv / "bin" / "python")
    args = ["/usr/bin/time", "-v", python, "-c", bootstrap(DRIVER), scenario, json.dumps(arguments)]
    done = subprocess.run(args, env=fiftyone.env, cwd=ROOT, capture_output=True, text=True, check=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert match is not None, done.stderr[-2000:]
    return int(match.group(1)) / 1024, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 384], help="samples per dataset")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="exclip-fo-memory-"))
    launcher = ServiceLauncher(None, f"m{uuid.uuid4().hex[:8]}", "scenes", work)
    venv = ensure_installation()
    (work / "db").mkdir()
    mongo = Mongo(venv, work / "db")
    rows = []
    try:
        service = launcher.embedded(EXCLIP_MODEL="exclip-scenes", EXCLIP_PRETRAINED="scenes").wait_ready()
        fiftyone = FiftyOne(venv, mongo, work)
        for n in args.sizes:
            name, directory = f"memory{n}", work / f"memory{n}"
            build = {"name": name, "directory": str(directory), "n": n, "seed": SEED}
            fiftyone.run("build", timeout_s=1800, image_size=args.image_size, **build)
            on_disk = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
            explain = {"name": name, "url": service.url, "caption_field": "caption"}
            explain |= {"phrases_field": "phrases", "concurrency": args.concurrency}
            peak, answer = peak_rss_mb(fiftyone, "explain", explain)
            assert isinstance(answer, dict) and answer["summary"]["explained"] == n, answer
            rows.append((n, on_disk, peak))
    finally:
        launcher.close()
        mongo.stop()
    print(f"scenes of {args.image_size} px, demo model, concurrency {args.concurrency}, CPU\n")
    print("| samples | image files on disk (MiB) | peak RSS of the explain_samples process (MiB) |")
    print("|---:|---:|---:|")
    for n, on_disk, peak in rows:
        print(f"| {n} | {on_disk:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
