"""``serve`` with no model named: the default real model if it can be had, else the demo model, loudly.

The download server is a real address on which nothing listens (``HF_ENDPOINT``), the Hugging Face cache
a fresh empty directory, so "the default's weights cannot be had" is true, not simulated. A model or
weights named by flag or env var never fall back.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from testing import ROOT, Process, free_port

EXAMPLES = ROOT / "service" / "web" / "static" / "examples"


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any model, queue or Hugging Face settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCLIP_", "HF_")) and k != "REDIS_URL"}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens: connection refused
        EXCLIP_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def fallback_service(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("default-model")
    port = free_port()
    proc = Process(["serve", "--port", str(port)], _clean_env(tmp_path), tmp_path, port)
    try:
        yield proc.wait_ready(timeout_s=120)
    finally:
        proc.stop()


def test_unrequested_default_falls_back_to_the_demo_model_loudly(fallback_service):
    models = httpx.get(fallback_service.url + "/models", timeout=10).json()
    assert models["default"] == "exclip-scenes"
    (info,) = models["models"]
    assert (info["name"], info["pretrained"], info["demo"]) == ("exclip-scenes", "scenes", True)
    assert "instead of the default ViT-B-16 (laion2b_s34b_b88k)" in info["description"]
    assert "synthetic scenes" in info["description"]
    assert info["options"]["text_layer"]["default"] == info["default_text_layer"]
    banner = fallback_service.output
    assert "!" * 100 in banner and "Serving the DEMO model exclip-scenes" in banner


def test_the_demo_model_explains_an_example_scene(fallback_service):
    example = json.loads((EXAMPLES / "examples.json").read_text())["examples"][0]
    phrase = next(p for p in example["phrases"] if p["text"] == example["highlight"])
    span = {"span": [phrase["start"], phrase["end"]]}
    body = {
        "image": base64.b64encode((EXAMPLES / example["file"]).read_bytes()).decode(),
        "captions": [{"text": example["caption"], "selections": [span]}],
        "wait": 120,
    }
    job = httpx.post(fallback_service.url + "/explain", json=body, timeout=150).json()
    assert job["status"] == "done", job
    (caption,) = job["result"]["captions"]
    assert caption["model"]["name"] == "exclip-scenes"
    assert (caption["grid"]["rows"], caption["grid"]["cols"]) == (8, 8)
    (selection,) = caption["selections"]
    assert [caption["tokens"][i]["text"] for i in selection["tokens"]] == phrase["text"].split()


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--pretrained", "laion2b_s34b_b88k"], {}), ([], {"EXCLIP_MODEL": "ViT-B-16"})],
    ids=["flag", "env"],
)
def test_a_requested_model_never_falls_back(tmp_path, args, env):
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port()), *args],
        env=_clean_env(tmp_path, HF_HUB_OFFLINE="1", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'ViT-B-16'" in proc.stderr and "laion2b_s34b_b88k" in proc.stderr
    assert "DEMO" not in proc.stderr and "exclip-scenes" not in proc.stderr
