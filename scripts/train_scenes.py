"""Train the demo CLIP ``exclip-scenes`` on fresh captioned scenes (attribution/evaluation/scenes.py), on CPU.

Contrastive CLIP loss over the batch, with each image's colour- and shape-swapped captions added as
hard negatives (NegCLIP) and a second loss that asks each image to pick its caption among its own swaps
(binding). Every step draws new scenes from a seed derived from (seed, step), so a resumed run sees
exactly the data an uninterrupted one would. ``OUT/last.pt`` (model + optimiser, written every
``--ckpt-every`` steps and on exit) resumes with ``--resume``; ``OUT/best.pt`` holds the model state
with the best held-out score so far; ``OUT/curve.csv`` logs step, wall time, loss and held-out accuracy.

    python scripts/train_scenes.py --out /work/train-scenes --steps 100000 --threads 2
    python scripts/train_scenes.py --out /work/train-scenes --steps 2400 --threads 2 --resume  # cool down

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

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from safetensors.torch import load_file
from tqdm import tqdm

from attribution.evaluation.retrieval import retrieval_accuracy, scene_pixels
from attribution.evaluation.scenes import (
    MAX_OBJECTS,
    Scene,
    describes,
    iter_scenes,
    replaced_caption,
    swapped_captions,
)
from attribution.models import SCENES_MODEL

HELD_OUT_SEED = 1_000_003  # never a training step's seed (those come from SeedSequence([seed, step]))
CURVE_FIELDS = ["step", "wall_s", "loss", "i2t_top1", "t2i_top1", "colour_swap", "shape_swap", "score"]


def objects_mix(step: int, curriculum_steps: int) -> list[float]:
    """Share of scenes with 1, 2, 3 objects: mostly simple scenes first, then mostly 2–3 (binding)."""
    t = min(1.0, step / max(1, curriculum_steps))
    start, end = np.array([0.5, 0.35, 0.15]), np.array([0.2, 0.4, 0.4])
    return list((1 - t) * start + t * end)


def training_batch(seed: int, step: int, batch: int, mix: list[float], image_size: int) -> list[Scene]:
    step_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    counts = np.random.default_rng(step_seed).multinomial(batch, mix)
    scenes: list[Scene] = []
    for n_objects, count in zip(range(1, MAX_OBJECTS + 1), counts, strict=True):
        stream = iter_scenes(step_seed + n_objects, n_objects=n_objects, image_size=image_size)
        scenes.extend(next(stream) for _ in range(count))
    return scenes


def negatives(
    scenes: list[Scene], rng: np.random.Generator | None, replaced: bool = False
) -> tuple[list[str], list[int]]:
    """Each scene's colour- and shape-swapped captions (and with ``replaced`` one caption with a shape
    replaced by another, for every scene), and the index of the scene each belongs to."""
    texts, owners = [], []
    for i, scene in enumerate(scenes):
        swaps = swapped_captions(scene, rng)
        candidates = [swaps.colour, swaps.shape]
        if replaced:
            candidates.append(replaced_caption(scene, "shape", rng))
        for text in candidates:
            if text is not None:
                texts.append(text)
                owners.append(i)
    return texts, owners


def also_true_mask(scenes: list[Scene], texts: list[str]) -> torch.Tensor:
    """(n, len(texts)) True where text j, other than scene i's own caption, also describes scene i.

    Such a caption is no negative: two pictures of a red circle are both "a red circle", whatever the
    template, so the contrastive loss must not push them apart.
    """
    mask = torch.tensor([[describes(t, s) for t in texts] for s in scenes])
    mask[torch.arange(len(scenes)), torch.arange(len(scenes))] = False
    return mask


def clip_losses(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    also_true: torch.Tensor,
    owners: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive loss with hard negatives, binding loss among each image's own swaps).

    ``tokens`` holds the batch's captions followed by the negatives; ``owners[m]`` is the image whose
    swap negative ``m`` is; ``also_true`` (from ``also_true_mask``) removes the false negatives.
    """
    n = pixels.shape[0]
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * img @ txt.T  # (n, n + m)
    logits = logits.masked_fill(also_true, float("-inf"))
    target = torch.arange(n)
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2
    if not owners:
        return contrastive, torch.zeros(())
    # Binding: each image with swaps chooses among [its caption, its own swaps] (-inf elsewhere).
    own = torch.full((n, tokens.shape[0] - n), float("-inf"))
    own[torch.tensor(owners), torch.arange(len(owners))] = 0.0
    has = torch.zeros(n, dtype=torch.bool)
    has[torch.tensor(owners)] = True
    pos = logits[torch.arange(n), torch.arange(n)][:, None]
    binding_logits = torch.cat([pos, logits[:, n:] + own], dim=1)[has]
    binding = F.cross_entropy(binding_logits, torch.zeros(int(has.sum()), dtype=torch.long))
    return contrastive, binding


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
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
    model = open_clip.create_model(SCENES_MODEL, pretrained=None)
    if args.init is not None:
        model.load_state_dict(initial_weights(args.init))
    if args.patch_dropout:
        model.visual.patch_dropout = PatchDropout(args.patch_dropout)
    model.train()
    tokenizer = open_clip.get_tokenizer(SCENES_MODEL)
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
            contrastive, binding = clip_losses(
                model, scene_pixels(scenes, mean, std), tokens, also_true, owners
            )
            loss = contrastive + args.binding_weight * binding
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
