"""Tiny random-weight open_clip models of each family the engine explains, with tokenizers, built offline.

No weights or tokenizer files can be downloaded here, and no pip package ships SigLIP's, SigLIP 2's,
BERT's or XLM-R's tokenizer, so everything is made locally in seconds:

- the tokenizers: a SentencePiece model trained on a few sentences (SigLIP), a Gemma-style
  ``Siglip2Tokenizer`` built in memory (SigLIP 2), a BERT ``WordPiece`` vocabulary (CLIPA), an XLM-R
  unigram vocabulary (MetaCLIP 2 worldwide), each saved with ``save_pretrained`` into a directory of
  this process (``tokenizer_dir``) and loaded through open_clip's ``HFTokenizer`` as a real one would be;
- the architectures: open_clip JSON configs with the keys of the real ones (``ViT-B-16-SigLIP``,
  ``ViT-B-16-SigLIP2``, ``ViT-L-14-CLIPA``, ``ViT-H-14-worldwide``, an EVA-style timm tower) at tiny
  sizes, their ``hf_tokenizer_name`` pointed at the local directory, registered with
  ``open_clip.add_model_config``; timm towers are registered with ``timm.models.register_model``.

``build_family(name)`` returns ``(model, tokenizer)`` for a name of ``FAMILIES``; ``family_arch(name)``
the open_clip architecture name (for ``attribution.models.load_model``). ``build_real(arch)`` builds a
real architecture (random weights) with a local tokenizer of the right kind, for slow tests.
"""

from __future__ import annotations

import atexit
import io
import json
import shutil
import string
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

FAMILIES = ("clip", "siglip", "siglip2", "clipa", "metaclip2", "timm-cls")

# Captions the SentencePiece models are trained on, and the words the in-memory vocabularies hold.
SENTENCES = [
    "a photo of a cat",
    "two dogs on the grass",
    "a red car near a tree",
    "the sky is blue",
    "many birds fly over water and hills",
    "quick brown fox jumps",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()})
PUNCTUATION = list(",.!?'-")
# Gemma's control tokens in Gemma's order (pad 0, eos 1, bos 2, unk 3), the space mark and letters; then the
# words of GEMMA_WORDS, bare and after the space mark, which the BPE merges build letter by letter.
GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581"]
GEMMA_WORDS = "a photo of cat dog red sky".split()

# The architectures of the tiny families; "clip" is the repo's own exclip-tiny (attribution/model_configs).
ARCH = {
    "clip": "exclip-tiny",
    "siglip": "exclip-tiny-siglip",
    "siglip2": "exclip-tiny-siglip2",
    "clipa": "exclip-tiny-clipa",
    "metaclip2": "exclip-tiny-metaclip2",
    "timm-cls": "exclip-tiny-timm-cls",
}
# Which local tokenizer each family's real counterpart needs (a key of _TOKENIZER_BUILDERS); None: CLIP's BPE.
FAMILY_TOKENIZER = {
    "clip": None,
    "siglip": "siglip",
    "siglip2": "gemma",
    "clipa": "bert",
    "metaclip2": "xlmr",
    "timm-cls": None,
}
# The tokenizer a real architecture's ``hf_tokenizer_name`` asks for -> the local builder of its kind.
REAL_TOKENIZERS = {
    "timm/ViT-B-16-SigLIP": "siglip",
    "timm/ViT-B-16-SigLIP2": "gemma",
    "bert-base-uncased": "bert",
    "facebook/xlm-v-base": "xlmr",
}
TIMM_SIGLIP = "exclip_tiny_siglip_vit"  # timm names: a register_model function's name is the model name
TIMM_CLS_REG = "exclip_tiny_cls_reg_vit"

_lock = threading.Lock()
_root: Path | None = None


def _workdir() -> Path:
    """This process's directory for tokenizers and configs (removed at exit)."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="exclip-families-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


# --- Tokenizers ------------------------------------------------------------------------------------------


def save_siglip_tokenizer(directory: Path) -> None:
    """A SentencePiece unigram model trained on ``SENTENCES`` (pad 0, eos 1, unk 2, as SigLIP's), saved as a
    ``transformers.SiglipTokenizer`` (a slow tokenizer: no ``offset_mapping``)."""
    import sentencepiece
    import transformers

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5),
        model_writer=model,
        vocab_size=32,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    transformers.SiglipTokenizer(vocab_file=str(directory / "spiece.model")).save_pretrained(directory)


def gemma_vocab_and_merges(words: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """A byte-pair vocabulary in Gemma's layout: control ids, letters, and ``words`` as whole pieces."""
    vocab = GEMMA_CONTROL + list(string.ascii_lowercase)
    merges: list[tuple[str, str]] = []  # in merge order
    for word in words:
        for start in (word[0], "\u2581" + word[0]):
            if start not in vocab:
                vocab.append(start)
                merges.append(("\u2581", word[0]))
            piece = start
            for ch in word[1:]:
                if (piece, ch) not in merges:
                    merges.append((piece, ch))
                piece += ch
                if piece not in vocab:
                    vocab.append(piece)
    return vocab, merges


def save_gemma_tokenizer(directory: Path, words: Sequence[str] = GEMMA_WORDS) -> None:
    """A Gemma-style ``Siglip2Tokenizer`` (a fast tokenizer: ``offset_mapping``) built in memory and saved;
    ``words`` are single pieces, everything else is spelled letter by letter."""
    import transformers

    vocab, merges = gemma_vocab_and_merges(words)
    # As open_clip converted SigLIP 2's tokenizer for the hub: padded on the right, </s> appended, no <bos>.
    tokenizer = transformers.Siglip2Tokenizer(
        vocab={p: i for i, p in enumerate(vocab)},
        merges=cast(Any, merges),  # pairs, which the tokenizers library takes though the stub says strings
        padding_side="right",
        add_bos_token=False,
        add_eos_token=True,
    )
    tokenizer.save_pretrained(directory)


def save_bert_tokenizer(directory: Path) -> None:
    """A lower-casing BERT ``WordPiece`` tokenizer ([PAD] 0 as bert-base-uncased's), built and saved."""
    import transformers

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PUNCTUATION
    pieces += [c for c in string.ascii_lowercase if c not in pieces]
    pieces += [f"##{c}" for c in string.ascii_lowercase]
    transformers.BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}).save_pretrained(directory)


def save_xlmr_tokenizer(directory: Path) -> None:
    """An XLM-R unigram tokenizer with XLM-V's control ids (<s> 0, <pad> 1, </s> 2, <unk> 3), saved."""
    import transformers

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in WORDS] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + "".join(PUNCTUATION)] + [("<mask>", 0.0)]
    transformers.XLMRobertaTokenizer(vocab=vocab).save_pretrained(directory)


_TOKENIZER_BUILDERS: dict[str, Callable[[Path], None]] = {
    "siglip": save_siglip_tokenizer,
    "gemma": save_gemma_tokenizer,
    "bert": save_bert_tokenizer,
    "xlmr": save_xlmr_tokenizer,
}


def tokenizer_dir(kind: str) -> Path:
    """The directory of a locally built tokenizer of ``kind`` (siglip, gemma, bert, xlmr), built once."""
    directory = _workdir() / "tokenizers" / kind
    with _lock:
        if not (directory / "tokenizer_config.json").is_file():
            _TOKENIZER_BUILDERS[kind](directory)
    return directory


def _vocab_size(kind: str) -> int:
    from open_clip.tokenizer import HFTokenizer

    return len(HFTokenizer(str(tokenizer_dir(kind))).tokenizer)


# --- timm towers ---------------------------------------------------------------------------------------


def _register_timm_models() -> None:
    """Tiny timm ViTs under local names: SigLIP's (no class token, MAP head) and one with a class token
    and two registers pooled on the class token."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TIMM_SIGLIP):
        return
    common = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)

    def build(args: dict[str, Any], kwargs: dict[str, Any]) -> VisionTransformer:
        pretrained_cfg = kwargs.pop("pretrained_cfg", None)  # timm's loading options, not the model's
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        model = VisionTransformer(**{**common, **args, **kwargs})
        # open_clip reads default_cfg, which timm's own builder sets (no pretrained weights: empty).
        cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
        for attribute in ("pretrained_cfg", "default_cfg"):  # plain attributes, not a module's parameters
            setattr(model, attribute, cfg)
        return model

    def exclip_tiny_siglip_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return build(dict(class_token=False, no_embed_class=True, global_pool="map"), kwargs)

    def exclip_tiny_cls_reg_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return build(dict(class_token=True, reg_tokens=2, no_embed_class=True, global_pool="token"), kwargs)

    register_model(exclip_tiny_siglip_vit)
    register_model(exclip_tiny_cls_reg_vit)


# --- open_clip configs ---------------------------------------------------------------------------------


def _text(kind: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"context_length": 16, "vocab_size": _vocab_size(kind), "width": 32, "heads": 2}
    cfg.update(layers=3, hf_tokenizer_name=str(tokenizer_dir(kind)), **extra)
    return cfg


def _siglip_config(kind: str, **text_extra: Any) -> dict[str, Any]:
    """ViT-B-16-SigLIP's keys (ViT-B-16-SigLIP2's with ``act_kwargs``) at tiny sizes."""
    return {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": TIMM_SIGLIP,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": _text(
            kind,
            tokenizer_kwargs={"clean": "canonicalize"},
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
            **text_extra,
        ),
    }


def _configs() -> dict[str, dict[str, Any]]:
    tiny_vit = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32}
    return {
        "siglip": _siglip_config("siglip"),
        "siglip2": _siglip_config("gemma", act_kwargs={"approximate": "tanh"}),
        # ViT-L-14-CLIPA's keys: average-pooled image tower, LN after the pool, no LN before the blocks;
        # a bidirectional text tower pooled on its last row, BERT's tokenizer with [SEP] made padding.
        "clipa": {
            "embed_dim": 32,
            "vision_cfg": dict(tiny_vit, no_ln_pre=True, pool_type="avg", final_ln_after_pool=True),
            "text_cfg": _text(
                "bert", tokenizer_kwargs={"strip_sep_token": True}, pool_type="last", no_causal_mask=True
            ),
        },
        # ViT-H-14-worldwide's keys: a CLIP ViT, a causal text tower pooled on the first </s> (id 2).
        "metaclip2": {
            "embed_dim": 32,
            "vision_cfg": dict(tiny_vit),
            "text_cfg": _text("xlmr", pool_type="eos", eos_id=2),
        },
        # EVA / MobileCLIP-B style: a timm tower pooled on its class token (here with registers), CLIP's text.
        "timm-cls": {
            "embed_dim": 32,
            "custom_text": True,
            "vision_cfg": {
                "image_size": 32,
                "timm_model_name": TIMM_CLS_REG,
                "timm_model_pretrained": False,
                "timm_pool": "token",
                "timm_proj": "linear",
            },
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
        },
    }


_registered = False


def register_families() -> None:
    """Build the tokenizers, register the timm towers and the open_clip configs (once per process)."""
    global _registered
    import open_clip

    import attribution.models  # noqa: F401 - importing registers exclip-tiny

    if _registered:
        return
    _register_timm_models()
    directory = _workdir() / "configs"
    directory.mkdir(exist_ok=True)
    for family, cfg in _configs().items():
        (directory / f"{ARCH[family]}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(directory)
    _registered = True


def family_arch(name: str) -> str:
    """The registered open_clip architecture name of family ``name`` (registering it first)."""
    if name not in ARCH:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    register_families()
    return ARCH[name]


def build_family(name: str, seed: int = 0) -> tuple[Any, Any]:
    """Family ``name``'s tiny model (seeded random weights, eval mode, gradients off) and its tokenizer."""
    import open_clip
    import torch

    arch = family_arch(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(arch)


# --- Real architectures --------------------------------------------------------------------------------


def real_tokenizer_dir(arch: str) -> Path:
    """A local tokenizer directory of the kind real architecture ``arch`` asks for (its ids differ from the
    real vocabulary's; the control ids and the cleaning are the real ones)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    name = (cfg or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if name not in REAL_TOKENIZERS:
        raise ValueError(f"no local tokenizer is built for {arch!r} (it asks for {name!r})")
    return tokenizer_dir(REAL_TOKENIZERS[name])


def build_real(arch: str, seed: int = 0, vocab_size: int | None = None) -> tuple[Any, Any]:
    """The real open_clip architecture ``arch`` with seeded random weights and a local tokenizer.

    ``vocab_size`` shrinks the text embedding table (MetaCLIP 2's has 900 000 rows, 3.7 GB): only the
    table changes, every block above it stays the real architecture's.
    """
    import open_clip
    import torch
    from open_clip.tokenizer import HFTokenizer

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{arch!r} is not an open_clip architecture")
    text_cfg = dict(cfg["text_cfg"])
    directory = real_tokenizer_dir(arch)
    text_cfg["hf_tokenizer_name"] = str(directory)
    if vocab_size is not None:
        text_cfg["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, text_cfg=text_cfg).eval().requires_grad_(False)
    tokenizer = HFTokenizer(
        str(directory), context_length=text_cfg["context_length"], **(text_cfg.get("tokenizer_kwargs") or {})
    )
    return model, tokenizer
