"""Train the demo models ``exclip-scenes`` / ``exclip-scenes-siglip`` on fresh captioned scenes, on CPU.

The scenes are attribution/evaluation/scenes.py's; the batches, hard negatives and losses are
``attribution.evaluation.scenes_training``'s (``--loss contrastive``: CLIP's loss with colour- and
shape-swapped captions as hard negatives; ``--loss sigmoid``: SigLIP's pairwise sigmoid loss with the swaps as
extra negative pairs; both plus a binding loss). ``--arch`` picks the registered architecture
(``exclip-scenes``, the default, or the SigLIP-style ``exclip-scenes-siglip``). This script runs them:
optimiser, schedule, checkpoints and the held-out curve. ``OUT/last.pt`` (model + optimiser, written every
``--ckpt-every`` steps and on exit) resumes with ``--resume``; ``OUT/best.pt`` holds the model state with the
best held-out score so far; ``OUT/curve.csv`` logs step, wall time, loss and held-out accuracy.

    python scripts/train_scenes.py --out runs/scenes --steps 100000 --threads 2
    python scripts/train_scenes.py --out runs/scenes --steps 2400 --threads 2 --resume  # cool down
    python scripts/train_scenes.py --out runs/siglip --arch exclip-scenes-siglip --loss sigmoid --steps 5000

``--init WEIGHTS`` starts from trained weights (the shipped export, a ``best.pt`` or a ``last.pt``) with a
fresh optimiser, to fine-tune; ``--patch-dropout P`` drops that share of image patches in each training
forward.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transformer import PatchDropout
from safetensors.torch import load_file
from tqdm import tqdm

from attribution.evaluation.retrieval import retrieval_accuracy, scene_pixels
from attribution.evaluation.scenes import HELD_OUT_SEED, iter_scenes
from attribution.evaluation.scenes_training import (
    ARCHITECTURES,
    LOSSES,
    also_true_mask,
    negatives,
    objects_mix,
    training_batch,
)
from attribution.models import get_tokenizer

CURVE_FIELDS = ["step", "wall_s", "loss", "i2t_top1", "t2i_top1", "colour_swap", "shape_swap", "score"]


def dropout_share(text: str) -> float:
    """``--patch-dropout``: a share of the patches, at least 0 and below 1 (some patch must be left)."""
    share = float(text)
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return share


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model state dict, float32, from an exported ``.safetensors`` file or a ``best.pt`` / ``last.pt``."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict") or checkpoint["model"]
    return {k: v.float() for k, v in state.items()}


def reinit_text_embeddings(model: torch.nn.Module, std: float) -> None:
    """Token and position embeddings of the text tower drawn again from N(0, std^2).

    A non-causal text tower sees a caption as a bag of words except through its position embeddings: it
    must learn from them alone that "a red circle and a blue square" is not its colour swap. At open_clip's
    0.01 (against 0.02 for the tokens) a run of exclip-scenes-siglip learnt a bag of words (the text cosine
    of a caption and its swaps 0.9999 after 1400 steps, swaps at chance); big_vision's SigLIP draws both
    with std 1/sqrt(width).
    """
    text: Any = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text, CLIP in itself
    with torch.no_grad():
        text.token_embedding.weight.normal_(0, std)
        text.positional_embedding.normal_(0, std)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        # Position embeddings (open_clip's "positional_embedding", timm's "pos_embed"), token embeddings
        # and the attention-pool head's query ("latent") are not decayed, nor vectors and scalars.
        skip = ("embedding", "pos_embed", "latent", "logit_scale")
        (no_decay if p.ndim < 2 or any(s in name for s in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Warmup, a constant stage, then a linear decay over the last ``--decay-steps`` of ``--steps``.

    The run's length need not be known in advance: start with a large ``--steps`` and, when the time is
    nearly up, resume with ``--steps`` = current step + decay steps to cool down (warmup-stable-decay).
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = args.steps - args.decay_steps
    if step < decay_start:
        return args.lr
    t = min(1.0, (step - decay_start) / max(1, args.decay_steps))
    return args.lr + t * (args.min_lr - args.lr)


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for checkpoints and the curve")
    ap.add_argument("--arch", choices=ARCHITECTURES, default=ARCHITECTURES[0])
    ap.add_argument("--loss", choices=sorted(LOSSES), default="contrastive")
    ap.add_argument("--steps", type=int, default=4000, help="total steps (the decay ends here)")
    ap.add_argument("--decay-steps", type=int, default=400, help="linear learning-rate decay at the end")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--binding-weight", type=float, default=1.0, help="weight of the loss among own swaps")
    ap.add_argument("--curriculum-steps", type=int, default=300, help="steps to reach the full object mix")
    ap.add_argument(
        "--replaced-negatives",
        action="store_true",
        help="also one caption per scene with a shape replaced (direct shape signal, single objects too)",
    )
    ap.add_argument(
        "--patch-dropout",
        type=dropout_share,
        default=0.0,
        help="share of image patches dropped at random in each training forward (FLIP); none at inference",
    )
    ap.add_argument(
        "--init",
        type=Path,
        help="start from these model weights (a .safetensors export, best.pt or last.pt), fresh optimiser",
    )
    ap.add_argument(
        "--text-embedding-std",
        type=float,
        help="draw the text tower's token and position embeddings from N(0, STD^2), as big_vision's SigLIP "
        "does with 1/sqrt(width), instead of open_clip's 0.02 / 0.01 (fresh runs only)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--held-out", type=int, default=256, help="held-out scenes for the accuracy numbers")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model(args.arch, pretrained=None)
    if args.text_embedding_std is not None:
        reinit_text_embeddings(model, args.text_embedding_std)
    if args.init is not None:
        model.load_state_dict(initial_weights(args.init))
    if args.patch_dropout:
        if not hasattr(model.visual, "patch_dropout"):
            ap.error(f"--patch-dropout needs open_clip's own ViT; {args.arch}'s image tower is not one")
        model.visual.patch_dropout = PatchDropout(args.patch_dropout)
    model.train()
    tokenizer = get_tokenizer(args.arch)
    losses = LOSSES[args.loss]
    image_size = model.visual.image_size[0]
    mean = torch.tensor(model.visual.preprocess_cfg["mean"])
    std = torch.tensor(model.visual.preprocess_cfg["std"])
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    stream = iter_scenes(HELD_OUT_SEED, image_size=image_size)
    held_out = [next(stream) for _ in range(args.held_out)]
    held_out_pixels = scene_pixels(held_out, mean, std)

    step, wall, best = 0, 0.0, -1.0
    metrics: dict[str, float] = {}  # the latest held-out evaluation
    last, curve_path = args.out / "last.pt", args.out / "curve.csv"
    if args.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, wall, best = state["step"], state["wall_s"], state["best_score"]
        metrics = state.get("metrics", {})
        print(f"resumed from {last} at step {step} ({wall:.0f} s trained, best score {best:.3f})")
    elif curve_path.exists():
        curve_path.unlink()
    with open(args.out / "run.txt", "a") as f:
        f.write(f"commit {git_commit()} args {vars(args)} start_step {step}\n")

    def checkpoint() -> None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "wall_s": wall,
                "best_score": best,
                "metrics": metrics,  # for export_scenes.py
                # Paths as text: the checkpoint then loads with weights_only=True (--init, export).
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            },
            last,
        )

    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=5)
    loss_avg = None
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            scenes = training_batch(
                args.seed, step, args.batch, objects_mix(step, args.curriculum_steps), image_size
            )
            neg_rng = np.random.default_rng([args.seed, step, 1])
            neg_texts, owners = negatives(scenes, neg_rng, args.replaced_negatives)
            captions = [s.caption for s in scenes]
            tokens = tokenizer(captions + neg_texts)
            also_true = also_true_mask(scenes, captions + neg_texts)
            main_loss, binding = losses(model, scene_pixels(scenes, mean, std), tokens, also_true, owners)
            loss = main_loss + args.binding_weight * binding
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            wall += time.perf_counter() - t0
            loss_value = loss.item()
            loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value
            if step % args.eval_every == 0 or step == args.steps:
                t1 = time.perf_counter()
                metrics = retrieval_accuracy(model, tokenizer, held_out_pixels, held_out)
                wall += time.perf_counter() - t1
                new_file = not curve_path.exists()
                with open(curve_path, "a", newline="") as f:
                    writer = csv.DictWriter(f, CURVE_FIELDS)
                    if new_file:
                        writer.writeheader()
                    writer.writerow(
                        {"step": step, "wall_s": round(wall, 1), "loss": round(loss_avg, 4)}
                        | {k: round(v, 4) for k, v in metrics.items()}
                    )
                if metrics["score"] > best:
                    best = metrics["score"]
                    save_atomic(
                        {"state_dict": model.state_dict(), "step": step, "metrics": metrics},
                        args.out / "best.pt",
                    )
            if step % args.ckpt_every == 0:
                checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", **{k[:6]: f"{v:.2f}" for k, v in metrics.items()})
    finally:
        checkpoint()
        bar.close()


if __name__ == "__main__":
    # `kill` (SIGTERM) stops like Ctrl-C: the finally-block writes last.pt first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
