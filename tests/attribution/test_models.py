"""load_model: the tiny architecture, random / checkpoint / tag weights, and every way it must refuse."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.pretrained import _PRETRAINED, _pcfg
from safetensors.torch import load_file
from torchvision.transforms import Resize

from attribution import models
from attribution.errors import InvalidOption, ModelNotAvailable, UnknownModel, UnsupportedModel
from attribution.evaluation.retrieval import retrieval_accuracy, scene_pixels
from attribution.evaluation.scenes import generate_scenes
from attribution.models import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    MODEL_CARDS,
    MODEL_CONFIG_DIR,
    SCENES_MODEL,
    TINY_MODEL,
    WEIGHTS_DIR,
    ModelCard,
    load_model,
    load_model_or_demo,
    weights_unavailable_reason,
)

REPO = Path(__file__).resolve().parents[2]
# The shipped exclip-scenes (fine-tuned 2026-11-29) on 128 held-out scenes (seed 4242) measured i2t
# 0.992, t2i 0.992 (chance, a random caption being true of the image: 0.015) and colour / shape swaps
# 1.0 / 1.0 (chance 0.5); BENCHMARKS.md, exclip-scenes. The thresholds leave a margin of 0.1 below the
# measured values for numerical differences between machines; the issue's own targets are 0.9 and 0.95.
SHIPPED_MIN = {"i2t_top1": 0.9, "t2i_top1": 0.89, "colour_swap": 0.9, "shape_swap": 0.9}


def test_tiny_architecture_is_registered_with_open_clip():
    cfg = open_clip.get_model_config(TINY_MODEL)
    assert cfg == json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL}.json").read_text())
    assert TINY_MODEL in open_clip.list_models()
    model = open_clip.create_model(TINY_MODEL)  # open_clip's own factory, no weights
    assert model.visual.grid_size == (4, 4)
    ids = open_clip.get_tokenizer(TINY_MODEL)(["a dog"])
    assert ids.shape == (1, 77)


def test_random_model_metadata_and_state(tiny_model):
    assert tiny_model.describe() == {
        "name": TINY_MODEL,
        "pretrained": None,
        "image_size": [32, 32],
        "patch_size": [8, 8],
        "grid": [4, 4],
        "context_length": 77,
        "text_layers": 3,
        "image_layers": 3,
        "embed_dim": 32,
        "default_text_layer": 2,
        "default_image_layer": 2,
        "description": None,
        "demo": False,
        "device": "cpu",
        "extra_columns": ["cls"],
        "extra_rows": [],
    }
    json.dumps(tiny_model.describe())
    assert not tiny_model.model.training
    assert not any(p.requires_grad for p in tiny_model.model.parameters())
    with torch.no_grad():
        img = tiny_model.model.encode_image(torch.zeros(1, 3, 32, 32))
        txt = tiny_model.model.encode_text(tiny_model.tokenizer(["a dog"]))
    assert img.shape == txt.shape == (1, 32)


@pytest.mark.parametrize("pretrained", [None, "none", "None", ""])
def test_no_weights_is_explicit_and_logged(pretrained, caplog):
    with caplog.at_level(logging.WARNING, logger="attribution.models"):
        loaded = load_model(TINY_MODEL, pretrained)
    assert loaded.pretrained is None
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records if r.name == "attribution.models")


def test_checkpoint_reloads_identical_weights(tiny_state_file):
    path, saved = tiny_state_file
    loaded = load_model(TINY_MODEL, str(path))
    assert loaded.pretrained == str(path)
    state = loaded.model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # and not by chance: a fresh random model differs
    other = load_model(TINY_MODEL, None).model.state_dict()
    assert not torch.equal(other["visual.conv1.weight"], saved["visual.conv1.weight"])


def test_training_checkpoint_format_is_accepted(tiny_state_file, tmp_path):
    # open_clip's training script saves {"epoch", "state_dict" (DDP "module." prefixed), ...}
    _, saved = tiny_state_file
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)
    state = load_model(TINY_MODEL, str(path)).model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_missing_checkpoint_path(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(ModelNotAvailable) as e:
        load_model(TINY_MODEL, str(missing))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)
    assert "--pretrained /path/to/checkpoint.pt" in str(e.value) and "--pretrained none" in str(e.value)


def test_checkpoint_that_does_not_fit(tiny_state_file, tmp_path):
    _, saved = tiny_state_file
    wrong = dict(saved)
    wrong["visual.conv1.weight"] = torch.zeros(1, 2, 3, 4)  # wrong shape for this architecture
    path = tmp_path / "wrong.pt"
    torch.save(wrong, path)
    with pytest.raises(ModelNotAvailable, match="exact architecture"):
        load_model(TINY_MODEL, str(path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelNotAvailable, match="garbage.pt"):
        load_model(TINY_MODEL, str(garbage))


@pytest.mark.parametrize("name", ["ViT-Z-99", "", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_unknown_model(name):
    with pytest.raises(UnknownModel) as e:
        load_model(name, None)
    assert repr(name) in str(e.value) and "ViT-B-16" in str(e.value) and "--pretrained none" in str(e.value)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelNotAvailable) as e:
        load_model("ViT-B-32", "laion9000_bogus")
    msg = str(e.value)
    assert "'laion9000_bogus'" in msg and "'ViT-B-32'" in msg and "laion2b_s34b_b79k" in msg
    assert not isinstance(e.value, UnknownModel)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("RN50", "ResNet"),
        ("EVA02-B-16", "Eva is not timm's VisionTransformer"),
        ("MobileCLIP-B", "non-standard embedder"),
        ("coca_ViT-B-32", "CoCa"),
        ("MobileCLIP2-L-14", "non-causal text tower pools with 'argmax'"),
        ("xlm-roberta-base-ViT-B-32", "Hugging Face text tower"),
    ],
)
def test_unsupported_architectures_are_refused_before_building(name, reason):
    with pytest.raises(UnsupportedModel, match=reason) as e:
        load_model(name, None)
    assert repr(name) in str(e.value)


@pytest.mark.parametrize("device", ["cuda:99", "tpu", "not a device"])
def test_bad_device(device):
    with pytest.raises(InvalidOption, match="device"):
        load_model(TINY_MODEL, None, device=device)


# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from open_clip.pretrained import _PRETRAINED, _pcfg
    from attribution.errors import ModelNotAvailable
    from attribution.models import TINY_MODEL, load_model

    cache, ckpt = sys.argv[1], sys.argv[2]
    out = {}
    try:
        load_model("ViT-B-32", "laion2b_s34b_b79k", cache_dir=cache)
        out["real_tag"] = "LOADED"
    except ModelNotAvailable as e:
        out["real_tag"] = str(e)

    # A tag of our own whose weights sit in the Hugging Face cache layout: offline, it must load.
    _PRETRAINED[TINY_MODEL] = {"cachedtag": _pcfg(hf_hub="exclip/tiny-test/", mean=(0.5, 0.5, 0.5),
                                                  std=(0.5, 0.5, 0.5), resize_mode="squash")}
    loaded = load_model(TINY_MODEL, "cachedtag", cache_dir=cache)
    saved = torch.load(ckpt)
    out["cached_tag"] = {
        "pretrained": loaded.pretrained,
        "same_weights": all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved.items()),
        "preprocess": {k: loaded.model.visual.preprocess_cfg[k] for k in ("mean", "resize_mode")},
        "steps": [type(t).__name__ for t in loaded.transform.transforms],
    }
    print("RESULT" + json.dumps(out))
    """
)


def test_tags_offline_never_fall_back_to_random(tiny_state_file, tmp_path):
    ckpt, _ = tiny_state_file
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--exclip--tiny-test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(ckpt.read_bytes())
    (cache / "models--exclip--tiny-test" / "refs").mkdir()
    (cache / "models--exclip--tiny-test" / "refs" / "main").write_text("0" * 40)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=str(REPO),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(cache), str(ckpt)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    msg = out["real_tag"]
    assert msg != "LOADED"
    assert "'ViT-B-32'" in msg and "'laion2b_s34b_b79k'" in msg and "--pretrained none" in msg
    tag = out["cached_tag"]
    assert tag["pretrained"] == "cachedtag" and tag["same_weights"]
    assert tag["preprocess"] == {"mean": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    assert tag["steps"][0] == Resize.__name__ and "CenterCrop" not in tag["steps"]


# --- the packaged demo model, model cards, and the unrequested-default fallback -----------------------


@pytest.fixture(scope="module")
def scenes_model():
    return load_model(SCENES_MODEL, "scenes")


def test_scenes_model_loads_the_packaged_weights(scenes_model):
    path = WEIGHTS_DIR / MODEL_CARDS[SCENES_MODEL].weights["scenes"]
    assert path.is_file() and path.stat().st_size <= 16 * 2**20  # fp16, small enough to ship
    shipped = load_file(str(path))
    state = scenes_model.model.state_dict()
    assert set(shipped) == set(state)
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())  # the file, not random init
    info = scenes_model.describe()
    assert info["pretrained"] == "scenes" and info["demo"] is True
    assert "synthetic scenes" in info["description"]
    assert (info["grid"], info["context_length"], info["image_size"]) == ([8, 8], 32, [64, 64])
    assert scenes_model.tokenizer(["a red circle"]).shape == (1, 32)


def test_missing_packaged_weights_raise_not_random(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)  # an installation without the file
    with pytest.raises(ModelNotAvailable, match="missing from this installation"):
        load_model(SCENES_MODEL, "scenes")


def test_packaged_tag_belongs_to_its_architecture():
    with pytest.raises(ModelNotAvailable, match="unknown for 'exclip-tiny'"):
        load_model(TINY_MODEL, "scenes")


def test_model_card_default_layers(monkeypatch):
    monkeypatch.setitem(MODEL_CARDS, TINY_MODEL, ModelCard(default_text_layer=0, default_image_layer=1))
    info = load_model(TINY_MODEL, None).describe()
    assert (info["default_text_layer"], info["default_image_layer"]) == (0, 1)
    monkeypatch.setitem(MODEL_CARDS, TINY_MODEL, ModelCard(default_image_layer=3))  # 3 blocks: 0..2
    with pytest.raises(UnsupportedModel, match="default image layer 3"):
        load_model(TINY_MODEL, None)


def test_shipped_model_matches_scenes_well_above_chance(scenes_model):
    """Held-out scenes the training never saw (seed 4242), through the serving transform.

    Measured on the shipped weights (see SHIPPED_MIN and BENCHMARKS.md); thresholds have a margin below.
    """
    scenes = generate_scenes(128, seed=4242)
    pixels = torch.stack([scenes_model.transform(s.image) for s in scenes])
    mean = torch.tensor(scenes_model.model.visual.preprocess_cfg["mean"])
    std = torch.tensor(scenes_model.model.visual.preprocess_cfg["std"])
    # Training fed the pixels straight in: the same tensor as the serving transform for 64x64 images.
    torch.testing.assert_close(pixels, scene_pixels(scenes, mean, std), atol=1e-5, rtol=0)
    acc = retrieval_accuracy(scenes_model.model, scenes_model.tokenizer, pixels, scenes)
    assert all(acc[name] >= low for name, low in SHIPPED_MIN.items()), acc


class _Silent:
    """A TCP server that accepts connections and never answers (a hanging download server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"


def test_unreachable_default_is_decided_quickly(monkeypatch, tmp_path):
    from huggingface_hub import constants

    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens here: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    reason = weights_unavailable_reason(DEFAULT_MODEL, DEFAULT_PRETRAINED, str(tmp_path))
    assert reason and "not reachable" in reason

    silent = _Silent()
    monkeypatch.setattr(constants, "ENDPOINT", silent.url)
    started = time.monotonic()
    reason = weights_unavailable_reason(DEFAULT_MODEL, DEFAULT_PRETRAINED, str(tmp_path), timeout_s=1.0)
    assert time.monotonic() - started < 10  # the bound; the probe gives up after 1 s
    assert reason and "did not answer" in reason
    silent.sock.close()


def test_cached_default_needs_no_network(monkeypatch, tmp_path, tiny_state_file):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # unreachable: the cache must do
    monkeypatch.setitem(_PRETRAINED, TINY_MODEL, {"cachedtag": _pcfg(hf_hub="exclip/tiny-test/")})
    assert weights_unavailable_reason(TINY_MODEL, "cachedtag", str(tmp_path)) is not None
    snapshot = tmp_path / "models--exclip--tiny-test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(tiny_state_file[0].read_bytes())
    (tmp_path / "models--exclip--tiny-test" / "refs").mkdir()
    (tmp_path / "models--exclip--tiny-test" / "refs" / "main").write_text("0" * 40)
    assert weights_unavailable_reason(TINY_MODEL, "cachedtag", str(tmp_path)) is None


def test_fallback_only_when_unrequested(monkeypatch, tmp_path, tiny_state_file, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="attribution.models"):
        demo = load_model_or_demo(DEFAULT_MODEL, DEFAULT_PRETRAINED, requested=False, cache_dir=str(tmp_path))
    assert (demo.name, demo.pretrained, demo.demo) == (SCENES_MODEL, "scenes", True)
    assert "instead of the default ViT-B-16" in demo.description and "synthetic scenes" in demo.description
    assert any("DEMO model" in r.getMessage() and "!!!!" in r.getMessage() for r in caplog.records)
    # Requested explicitly (here an existing checkpoint), nothing is probed or replaced.
    ckpt = str(tiny_state_file[0])
    loaded = load_model_or_demo(TINY_MODEL, ckpt, requested=True)
    assert (loaded.name, loaded.pretrained, loaded.demo) == (TINY_MODEL, ckpt, False)
    # Requested and unavailable: the error, never the demo.
    with pytest.raises(ModelNotAvailable):
        load_model_or_demo(TINY_MODEL, str(tmp_path / "missing.pt"), requested=True)


@pytest.mark.parametrize(
    ("family", "grid", "context"),
    [("siglip", (4, 4), 16), ("siglip2", (4, 4), 16), ("metaclip2", (4, 4), 16), ("timm-cls", (4, 4), 16)],
)
def test_other_families_load_with_their_local_tokenizers_and_explain(family, grid, context):
    from attribution.explainer import Explainer
    from testing.families import FAMILY_TOKENIZER, family_arch, tokenizer_dir

    kind = FAMILY_TOKENIZER[family]
    tokenizer = None if kind is None else str(tokenizer_dir(kind))
    loaded = load_model(family_arch(family), None, tokenizer=tokenizer)
    sizes = (loaded.grid, loaded.context_length, loaded.patch_size, loaded.embed_dim)
    assert sizes == (grid, context, (8, 8), 32)
    assert loaded.image_layers == loaded.text_layers == 3
    image = torch.randn(1, 3, *loaded.image_size)
    result = Explainer(loaded.model, loaded.tokenizer, steps=2).explain(image, ["a cat"])[0]
    assert result.interactions.shape[1:] == grid
    assert abs(float(result.entries().sum()) - result.completeness.total) < 1e-5
