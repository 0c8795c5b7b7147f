"""Loading open_clip CLIP models: one entry point, explicit weights, never a silent random fallback.

``load_model(name, pretrained)`` accepts an open_clip architecture name plus either a pretrained tag
(downloaded into ``cache_dir`` where there is internet, or found there when there is not), a local
checkpoint file (anything open_clip's own ``load_checkpoint`` reads: a plain ``state_dict`` saved with
``torch.save``, a training checkpoint with a ``state_dict`` key, ``.safetensors``), or ``None`` /
``"none"`` / ``""`` for random weights (logged as a warning). Every other case raises, naming the model
and saying how to pass a checkpoint or ``--pretrained none``.

Importing this module registers the architectures in ``attribution/model_configs/*.json`` (the tiny test model
``exclip-tiny``, the demo models ``exclip-scenes`` and ``exclip-scenes-siglip``) with open_clip's
``add_model_config``, so ``open_clip.create_model("exclip-tiny")`` and
``open_clip.get_tokenizer("exclip-tiny")`` work.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import queue
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip import get_model_config
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from attribution import timm_archs  # noqa: F401  # registers the timm towers the configs name
from attribution.errors import InvalidOption, ModelNotAvailable, UnknownModel, UnsupportedModel
from attribution.text import Tokenizer
from attribution.tokenizers import HFTokenizer, hf_tokenizer_source, load_hf_tokenizer
from attribution.towers import PADDING_ROW, image_tower, text_tower

log = logging.getLogger(__name__)

TINY_MODEL = "exclip-tiny"
SCENES_MODEL = "exclip-scenes"
SCENES_SIGLIP_MODEL = "exclip-scenes-siglip"

# Architecture registry as data: open_clip model-config JSON files (its own schema), one per architecture.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_NO_WEIGHTS = {"", "none"}
_HOW_TO = (
    "pass a local checkpoint with --pretrained /path/to/checkpoint.pt (EXCLIP_PRETRAINED), "
    "or --pretrained none for random weights"
)

open_clip.add_model_config(MODEL_CONFIG_DIR)

# Weights and tokenizers shipped inside the package, and what the package says about each architecture.
WEIGHTS_DIR = Path(__file__).parent / "weights"
TOKENIZERS_DIR = Path(__file__).parent / "tokenizers_data"
MODEL_CARDS_FILE = Path(__file__).parent / "model_cards.json"


@dataclass(frozen=True)
class ModelCard:
    """What the package states about an architecture beyond open_clip's config (model_cards.json)."""

    description: str | None = None
    demo: bool = False  # a toy model (e.g. trained on synthetic scenes), to be labelled as such
    default_text_layer: int | None = None  # None: the last block
    default_image_layer: int | None = None
    weights: dict[str, str] = field(default_factory=dict)  # pretrained tag -> file under WEIGHTS_DIR
    tokenizer: str | None = None  # its Hugging Face tokenizer: a directory under TOKENIZERS_DIR


def _read_model_cards() -> dict[str, ModelCard]:
    return {name: ModelCard(**card) for name, card in json.loads(MODEL_CARDS_FILE.read_text()).items()}


MODEL_CARDS: dict[str, ModelCard] = _read_model_cards()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A CLIP model ready for explanation, with the metadata the rest of the library needs."""

    model: torch.nn.Module = field(repr=False)
    tokenizer: Tokenizer | HFTokenizer = field(repr=False)
    transform: Callable[[Any], torch.Tensor] = field(repr=False)
    name: str
    pretrained: str | None
    device: torch.device
    image_size: tuple[int, int]  # (h, w) model-input pixels
    patch_size: tuple[int, int]  # (w, h) model-input pixels, as every patch size (ImageGeometry's too)
    grid: tuple[int, int]  # (rows, cols)
    context_length: int
    text_layers: int
    image_layers: int
    embed_dim: int
    default_text_layer: int  # the blocks explained when a request names none
    default_image_layer: int
    description: str | None = None
    demo: bool = False
    # What each result carries beside the caption x patch matrix (PairResult.extra_columns / extra_rows).
    extra_columns: tuple[str, ...] = ()
    extra_rows: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (used by ``GET /models``)."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "grid": list(self.grid),
            "context_length": self.context_length,
            "text_layers": self.text_layers,
            "image_layers": self.image_layers,
            "embed_dim": self.embed_dim,
            "default_text_layer": self.default_text_layer,
            "default_image_layer": self.default_image_layer,
            "description": self.description,
            "demo": self.demo,
            "device": str(self.device),
            "extra_columns": list(self.extra_columns),
            "extra_rows": list(self.extra_rows),
        }


# Config keys that swap open_clip's standard blocks for variants the engine's tail does not model.
_CUSTOM_BLOCK_KEYS = (
    *("block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner"),
    *("scale_attn", "scale_fc", "attentional_pool"),
)


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """Why the engine cannot explain a model with this open_clip config, or None if it can.

    The engine explains the towers of :mod:`attribution.towers`: open_clip's ViT pooled on the class
    token or the mean of the patches, timm's ViT (standard pre-norm blocks) pooled on the class token,
    the mean or a latent query (SigLIP); open_clip's text transformer pooled on the EOT (causal,
    CLIP's BPE tokenizer, which gives EOT the highest id), the first EOS (causal) or the last row
    (non-causal). A timm trunk is built on the meta device (no weights, no memory) to check its blocks.
    """
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is a ResNet, not a ViT"
    if "hf_model_name" in text or "multimodal_cfg" in cfg:
        return "it has a Hugging Face text tower or a multimodal decoder (CoCa), not open_clip's transformer"
    for tower, sub in (("image", vision), ("text", text)):
        custom = [k for k in _CUSTOM_BLOCK_KEYS if sub.get(k)]
        if custom:
            return f"its {tower} tower uses non-standard blocks or pooling ({', '.join(custom)})"
    if "timm_model_name" in vision:
        reason = _timm_reason(vision, int(cfg.get("embed_dim", 512)))
        if reason:
            return reason
    elif vision.get("pool_type", "tok") not in ("tok", "avg"):
        return f"its image tower pools with {vision.get('pool_type')!r} (only the class token or the mean)"
    return _text_reason(text, cfg)


def _text_reason(text: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    pool, causal = text.get("pool_type", "argmax"), not text.get("no_causal_mask", False)
    if text.get("embed_cls") or (text.get("use_pad_mask") and not causal):
        return "its text tower appends a class token or masks padding (CoCa-style)"
    if pool not in ("argmax", "eos", "last"):
        return f"its text tower pools with {pool!r} (only 'argmax' or 'eos' when causal, 'last' when not)"
    if causal == (pool == "last"):
        kind = "causal" if causal else "non-causal"
        return (
            f"its {kind} text tower pools with {pool!r} (only 'argmax' or 'eos' when causal, 'last' when not)"
        )
    if pool == "argmax" and hf_tokenizer_source(cfg):  # its tokens have offsets, but not CLIP's ids
        return (
            f"its text tower pools on the highest token id, which is the end-of-text token only with "
            f"CLIP's BPE tokenizer, not with the Hugging Face tokenizer {text['hf_tokenizer_name']!r}"
        )
    kwargs = text.get("tokenizer_kwargs") or {}
    if kwargs.get("tokenizer_mode"):
        return (
            f"its tokenizer runs in mode {kwargs['tokenizer_mode']!r}, for which caption tokens have no "
            "character offsets"
        )
    return None


@functools.lru_cache(maxsize=64)
def _timm_trunk_reason(name: str, pool: str, proj: str, embed_dim: int, image_size: int) -> str | None:
    from open_clip.timm_model import TimmModel

    from attribution.towers import TimmImageTower

    try:
        with torch.device("meta"):
            visual = TimmModel(name, embed_dim, image_size=image_size, pool=pool, proj=proj)
    except Exception as e:  # an unknown timm name, or a trunk that cannot be built without weights
        return f"its timm image tower {name!r} cannot be built: {type(e).__name__}: {e}"
    try:
        TimmImageTower(torch.nn.ModuleDict({"visual": visual}))
    except UnsupportedModel as e:
        return str(e)
    return None


def _timm_reason(vision: dict[str, Any], embed_dim: int) -> str | None:
    pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn") or proj == "mlp":
        return f"its timm image tower pools with {pool!r} or projects with {proj!r} (not linear)"
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return _timm_trunk_reason(str(vision["timm_model_name"]), pool, proj, embed_dim, size)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidOption(f"device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOption(f"device {device!r} requested but CUDA is not available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidOption(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif dev.type != "cpu":
        raise InvalidOption(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def _download_tag(name: str, tag: str, pcfg: dict[str, Any], cache_dir: str | None) -> str:
    """Path of the tag's weights file, downloaded unless cached; ModelNotAvailable when it cannot be had."""
    try:
        path: str = open_clip.download_pretrained(pcfg, cache_dir=cache_dir)
        return path
    except Exception as e:  # network, hub and file-system errors all mean "not available"
        raise ModelNotAvailable(
            f"weights for model {name!r} with pretrained tag {tag!r} could not be downloaded or found in "
            f"the cache ({cache_dir or 'open_clip default cache'}): {type(e).__name__}: {e}; {_HOW_TO}"
        ) from e


def _create(name: str, checkpoint: str | None, preprocess: dict[str, Any] | None, what: str) -> Any:
    try:
        return open_clip.create_model(name, pretrained=checkpoint, force_preprocess_cfg=preprocess)
    except Exception as e:  # unreadable file, wrong architecture (strict load), unpickling refusals
        raise ModelNotAvailable(
            f"model {name!r} could not be built from {what}: {type(e).__name__}: {e}; "
            f"the checkpoint must be an open_clip state_dict of this exact architecture. {_HOW_TO}"
        ) from e


def load_model(
    name: str,
    pretrained: str | None,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Build an open_clip CLIP model with the requested weights, in eval mode, gradients off.

    ``pretrained``: an open_clip tag for ``name``, a path to a local checkpoint file, or ``None`` /
    ``"none"`` / ``""`` for random weights. ``tokenizer``: a local directory holding the model's Hugging
    Face tokenizer (else the Hugging Face cache, or hub unless ``HF_HUB_OFFLINE``); only for models with
    one (CLIP's BPE tokenizer ships with open_clip). Raises ``UnknownModel`` (bad name), ``ModelNotAvailable``
    (weights cannot be had), ``UnsupportedModel`` (not a ViT CLIP the engine explains), ``InvalidOption``
    (bad device).
    """
    dev = _resolve_device(device)
    # Schema names (hf-hub:, local-dir:) would fetch configs; only registered architectures are accepted.
    cfg = get_model_config(name) if isinstance(name, str) and name and ":" not in name else None
    if cfg is None:
        # Lazily: checking a timm tower builds it on the meta device.
        candidates = (m for m in open_clip.list_models() if not unsupported_reason(get_model_config(m)))
        supported = list(itertools.islice(candidates, 12))
        raise UnknownModel(
            f"model {name!r} is not an open_clip architecture; supported names include "
            f"{', '.join(supported[:12])}, ... (open_clip.list_models()); {_HOW_TO}"
        )
    reason = unsupported_reason(cfg)
    if reason:
        raise UnsupportedModel(
            f"model {name!r} cannot be explained: {reason}. Supported: open_clip models with ViT image "
            "towers (open_clip's or timm's) and open_clip's text transformer (e.g. ViT-B-32, ViT-B-16, "
            "ViT-L-14, ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ViT-H-14-worldwide)"
        )

    text_tokenizer = get_tokenizer(name, tokenizer, cache_dir)
    card = MODEL_CARDS.get(name, ModelCard())
    tag = None if pretrained is None or pretrained.strip().lower() in _NO_WEIGHTS else pretrained
    if tag is None:
        log.warning("model %s: no pretrained weights requested, using RANDOM weights", name)
        model = _create(name, None, None, "random initialisation")
    elif tag in card.weights:
        packaged = WEIGHTS_DIR / card.weights[tag]
        if not packaged.is_file():
            raise ModelNotAvailable(
                f"the weights for model {name!r} with tag {tag!r} ship with the package as {packaged}, but "
                f"that file is missing from this installation (reinstall exclip-service); {_HOW_TO}"
            )
        model = _create(name, str(packaged), None, f"packaged weights {tag!r} ({packaged})")
    elif os.path.isfile(tag):
        model = _create(name, tag, None, f"checkpoint file {tag!r}")
    elif _looks_like_path(tag):
        raise ModelNotAvailable(f"checkpoint file {tag!r} for model {name!r} does not exist; {_HOW_TO}")
    else:
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            known = f"known tags: {', '.join(tags)}" if tags else "open_clip has no tags for it"
            raise ModelNotAvailable(f"pretrained tag {tag!r} is unknown for {name!r} ({known}); {_HOW_TO}")
        path = _download_tag(name, tag, pcfg, cache_dir)
        # The tag's preprocessing (mean/std, interpolation, resize mode) belongs with its weights.
        model = _create(name, path, merge_preprocess_dict({}, pcfg), f"pretrained tag {tag!r} ({path})")

    if card.demo:
        log.warning("model %s: %s", name, card.description)
    try:
        image, text = image_tower(model), text_tower(model)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"model {name!r} cannot be explained: {e}") from e
    model = model.to(dev).eval().requires_grad_(False)
    visual = model.visual
    text_layers, image_layers = text.n_layers, image.n_layers
    return LoadedModel(
        model=model,
        tokenizer=text_tokenizer,
        transform=image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False),
        name=name,
        pretrained=tag,
        device=dev,
        image_size=_pair(visual.image_size),
        patch_size=(image.patch_size[1], image.patch_size[0]),  # towers give (h, w)
        grid=image.layout.grid,
        context_length=text.context_length,
        text_layers=text_layers,
        image_layers=image_layers,
        embed_dim=int(cfg["embed_dim"]),
        default_text_layer=_default_layer(name, "text", card.default_text_layer, text_layers),
        default_image_layer=_default_layer(name, "image", card.default_image_layer, image_layers),
        description=card.description,
        demo=card.demo,
        extra_columns=tuple(image.layout.extras),
        extra_rows=() if text.causal else (PADDING_ROW,),
    )


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def get_tokenizer(
    name: str, path: str | None = None, cache_dir: str | None = None
) -> Tokenizer | HFTokenizer:
    """The tokenizer of the registered architecture ``name``: a Hugging Face one from ``path``, else the
    directory its model card ships, else the HF cache; CLIP's BPE for the models without one."""
    cfg = get_model_config(name)
    if hf_tokenizer_source(cfg):
        shipped = MODEL_CARDS.get(name, ModelCard()).tokenizer
        return load_hf_tokenizer(
            name, cfg, path or (str(TOKENIZERS_DIR / shipped) if shipped else None), cache_dir
        )
    if path:
        raise InvalidOption(
            f"a tokenizer ({path!r}) was given, but model {name!r} uses CLIP's BPE tokenizer, which ships "
            "with open_clip; leave --tokenizer (EXCLIP_TOKENIZER) unset for it"
        )
    bpe: Tokenizer = open_clip.get_tokenizer(name)
    return bpe


def _default_layer(name: str, tower: str, stated: int | None, n_layers: int) -> int:
    if stated is None:
        return n_layers - 1
    if not 0 <= stated < n_layers:
        raise UnsupportedModel(
            f"model card of {name!r}: default {tower} layer {stated} is not in 0..{n_layers - 1}"
        )
    return stated


# --- What `serve` runs when no model was asked for -------------------------------------------------------

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "laion2b_s34b_b88k"
DEMO_MODEL, DEMO_PRETRAINED = SCENES_MODEL, "scenes"
PROBE_TIMEOUT_S = 3.0


def load_model_or_demo(
    name: str,
    pretrained: str | None,
    *,
    requested: bool,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    tokenizer: str | None = None,
) -> LoadedModel:
    """``load_model``, except that an unrequested default whose weights can be had neither from the cache
    nor (one short probe) from the network is replaced by the packaged demo model, with a loud warning.

    ``requested``: the user named a model or weights (flag, env var, setting); then nothing falls back.
    """
    if requested:
        return load_model(name, pretrained, device=device, cache_dir=cache_dir, tokenizer=tokenizer)
    reason = weights_unavailable_reason(name, pretrained, cache_dir, probe_timeout_s)
    if reason is None:
        try:
            return load_model(name, pretrained, device=device, cache_dir=cache_dir, tokenizer=tokenizer)
        except ModelNotAvailable as e:  # reachable a moment ago, but the download failed after all
            reason = str(e)
    demo = load_model(DEMO_MODEL, DEMO_PRETRAINED, device=device)
    note = (
        f"Serving the DEMO model {DEMO_MODEL} instead of the default {name} ({pretrained}), whose weights "
        f"could not be had: {reason}"
    )
    banner = "!" * 100
    log.warning(
        "\n%s\n%s\nTo serve a real model, pass --model/--pretrained (or a checkpoint path).\n%s",
        banner,
        note,
        banner,
    )
    return dataclasses.replace(demo, description=f"{note}. {demo.description}")


def weights_unavailable_reason(
    name: str, pretrained: str | None, cache_dir: str | None, timeout_s: float = PROBE_TIMEOUT_S
) -> str | None:
    """None when the tag's weights are cached or their server answers within ``timeout_s``; else why not.

    Decides in about ``timeout_s`` (one HEAD request, run in a daemon thread so that a hanging DNS lookup
    cannot hold it up), rather than after the minute of retries a failing download takes.
    """
    pcfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if not pcfg:
        return f"{pretrained!r} is not an open_clip pretrained tag of {name!r}"
    hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if hub:
        import huggingface_hub
        from huggingface_hub import constants

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        # open_clip tries the .safetensors twin of a .bin file first.
        safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else None
        for candidate in filter(None, (safe, filename)):
            if isinstance(huggingface_hub.try_to_load_from_cache(repo, candidate, cache_dir=cache_dir), str):
                return None
        if constants.HF_HUB_OFFLINE:
            return "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        probe = f"{constants.ENDPOINT}/{repo}/resolve/main/{filename}"
    elif url:
        cached = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if cached.is_file():
            return None
        probe = url
    else:
        return f"open_clip gives no download source for {name!r} {pretrained!r}"
    return _probe(probe, timeout_s)


def _probe(url: str, timeout_s: float) -> str | None:
    """None when ``url`` answers a HEAD request with a status below 400 within ``timeout_s``."""
    answer: queue.Queue[str | None] = queue.Queue()

    def head() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                answer.put(None if reply.status < 400 else f"HTTP {reply.status} from {url}")
        except TimeoutError:  # the socket's own timeout can fire before the wait below: same meaning
            answer.put(f"{url} did not answer within {timeout_s:g} s")
        except Exception as e:  # DNS, refused, TLS, HTTP errors: all mean "cannot download now"
            answer.put(f"{url} is not reachable: {type(e).__name__}: {e}")

    threading.Thread(target=head, daemon=True, name="exclip-weights-probe").start()
    try:
        return answer.get(timeout=timeout_s)
    except queue.Empty:
        return f"{url} did not answer within {timeout_s:g} s"
