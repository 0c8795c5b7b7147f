"""Loading open_clip CLIP models: one entry point, explicit weights, never a silent random fallback.

``load_model(name, pretrained)`` accepts an open_clip architecture name plus either a pretrained tag
(downloaded into ``cache_dir`` where there is internet, or found there when there is not), a local
checkpoint file (anything open_clip's own ``load_checkpoint`` reads: a plain ``state_dict`` saved with
``torch.save``, a training checkpoint with a ``state_dict`` key, ``.safetensors``), or ``None`` /
``"none"`` / ``""`` for random weights (logged as a warning). Every other case raises, naming the model
and saying how to pass a checkpoint or ``--pretrained none``.

Importing this module registers the architectures in ``attribution/model_configs/*.json`` (the tiny
test model ``exclip-tiny``, the demo model ``exclip-scenes``) with open_clip's ``add_model_config``, so
``open_clip.create_model("exclip-tiny")`` and ``open_clip.get_tokenizer("exclip-tiny")`` work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip import get_model_config
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer

from attribution.errors import InvalidOption, ModelNotAvailable, UnknownModel, UnsupportedModel

log = logging.getLogger(__name__)

TINY_MODEL = "exclip-tiny"
SCENES_MODEL = "exclip-scenes"

# Architecture registry as data: open_clip model-config JSON files (its own schema), one per architecture.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_NO_WEIGHTS = {"", "none"}
_HOW_TO = (
    "pass a local checkpoint with --pretrained /path/to/checkpoint.pt (EXCLIP_PRETRAINED), "
    "or --pretrained none for random weights"
)

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A CLIP model ready for explanation, with the metadata the rest of the library needs."""

    model: torch.nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False)
    transform: Callable[[Any], torch.Tensor] = field(repr=False)
    name: str
    pretrained: str | None
    device: torch.device
    image_size: tuple[int, int]  # (h, w) model-input pixels
    patch_size: tuple[int, int]  # (h, w) model-input pixels
    grid: tuple[int, int]  # (rows, cols)
    context_length: int
    text_layers: int
    image_layers: int
    embed_dim: int

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
            "device": str(self.device),
        }


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """Why the engine cannot explain a model with this open_clip config, or None if it can.

    The engine needs a standard ``CLIP``: a ViT image tower pooled on its class token and open_clip's
    built-in causal text transformer pooled on the end-of-text token, with CLIP's BPE tokenizer.
    """
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in vision:
        return f"its image tower is a timm model ({vision['timm_model_name']}), not open_clip's ViT"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is a ResNet, not a ViT"
    if "hf_model_name" in text or cfg.get("custom_text") or "multimodal_cfg" in cfg:
        return "it has a custom or Hugging Face text tower (CustomTextCLIP / CoCa), not CLIP's own"
    if vision.get("attentional_pool"):
        return "its image tower uses attentional pooling"
    if vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool"):
        return f"its image tower pools with {vision.get('pool_type')!r} instead of the class token"
    if text.get("pool_type", "argmax") != "argmax" or text.get("embed_cls") or text.get("no_causal_mask"):
        return "its text tower does not pool on the end-of-text token of a causal transformer"
    if text.get("hf_tokenizer_name"):
        return f"it uses the Hugging Face tokenizer {text['hf_tokenizer_name']!r}, not CLIP's BPE tokenizer"
    if (text.get("tokenizer_kwargs") or {}).get("clean", "lower") not in ("lower", "whitespace"):
        return "its tokenizer canonicalises text (drops punctuation), so token offsets cannot be kept"
    return None


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
        return open_clip.download_pretrained(pcfg, cache_dir=cache_dir)
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
) -> LoadedModel:
    """Build an open_clip CLIP model with the requested weights, in eval mode, gradients off.

    ``pretrained``: an open_clip tag for ``name``, a path to a local checkpoint file, or ``None`` /
    ``"none"`` / ``""`` for random weights. Raises ``UnknownModel`` (bad name), ``ModelNotAvailable``
    (weights cannot be had), ``UnsupportedModel`` (not a ViT CLIP the engine explains), ``InvalidOption``
    (bad device).
    """
    dev = _resolve_device(device)
    # Schema names (hf-hub:, local-dir:) would fetch configs; only registered architectures are accepted.
    cfg = get_model_config(name) if isinstance(name, str) and name and ":" not in name else None
    if cfg is None:
        supported = [m for m in open_clip.list_models() if not unsupported_reason(get_model_config(m))]
        raise UnknownModel(
            f"model {name!r} is not an open_clip architecture; supported names include "
            f"{', '.join(supported[:12])}, ... (open_clip.list_models()); {_HOW_TO}"
        )
    reason = unsupported_reason(cfg)
    if reason:
        raise UnsupportedModel(
            f"model {name!r} cannot be explained: {reason}. Supported: open_clip CLIP models with a ViT "
            "image tower and the built-in text transformer (e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
        )

    tag = None if pretrained is None or pretrained.strip().lower() in _NO_WEIGHTS else pretrained
    if tag is None:
        log.warning("model %s: no pretrained weights requested, using RANDOM weights", name)
        model = _create(name, None, None, "random initialisation")
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

    if not isinstance(model, open_clip.CLIP) or not isinstance(model.visual, VisionTransformer):
        raise UnsupportedModel(f"model {name!r} built as {type(model).__name__}, not a ViT CLIP")
    model = model.to(dev).eval().requires_grad_(False)
    visual = model.visual
    return LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        transform=image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False),
        name=name,
        pretrained=tag,
        device=dev,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        grid=tuple(visual.grid_size),
        context_length=int(model.context_length),
        text_layers=len(model.transformer.resblocks),
        image_layers=len(visual.transformer.resblocks),
        embed_dim=int(model.text_projection.shape[1]),
    )
