"""``bench/gpu_check.py`` — the one script a lent GPU runs — kept working by running it on the CPU.

``--quick`` uses exclip-tiny and small counts; the full run differs only in models and counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    env.pop("REDIS_URL", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    [equivalence] = report["equivalence"]
    assert equivalence["model"] == "exclip-tiny"
    assert equivalence["max_rel_error"] <= 1e-4  # engine and reference agree on this device
    assert equivalence["max_rel_error_tf32"] <= 1e-4  # reported; a CPU has no TF32 to lose accuracy to

    rows = {(r["precision"], r["pairs"]): r for r in report["throughput"]}
    assert set(rows) == {(p, k) for p in ("float32", "bfloat16") for k in ("distinct", "2x4")}
    assert all(r["n_pairs"] == 8 and r["pairs_per_s"] > 0 for r in rows.values())
    assert all(0 < r["max_tangents"] <= 4096 for r in rows.values())  # the CPU cap of attribution/memory.py

    service = {r["batching"]: r for r in report["service"]}
    assert set(service) == {"on", "off"}
    for row in service.values():  # every request of 16 concurrent clients answered, with its own result
        assert row["clients"] == 16
        assert (row["ok"], row["failures"]) == (32, 0), row["failure_examples"]
        assert row["p50_ms"] > 0
