"""Convert a train_scenes.py checkpoint into the packaged fp16 weights of ``exclip-scenes`` (or ``--arch``).

    python scripts/export_scenes.py runs/scenes/best.pt attribution/weights/exclip-scenes.safetensors
    python scripts/export_scenes.py --arch exclip-scenes-siglip runs/siglip/best.pt \
        attribution/weights/exclip-scenes-siglip.safetensors

The file is a plain open_clip state_dict in float16 (open_clip's ``load_checkpoint`` reads it), with the
training step and held-out metrics in the safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from attribution.evaluation.scenes_training import ARCHITECTURES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="best.pt or last.pt written by scripts/train_scenes.py")
    ap.add_argument("out", type=Path, help="the .safetensors file to write")
    ap.add_argument("--arch", choices=ARCHITECTURES, default=ARCHITECTURES[0])
    args = ap.parse_args(argv)

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict") or ckpt["model"]
    # Strict load into the registered architecture first: a mismatch fails here, not in a user's hands.
    open_clip.create_model(args.arch).load_state_dict(state, strict=True)
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    meta = {
        "architecture": args.arch,
        "step": str(ckpt.get("step")),
        "metrics": json.dumps(ckpt.get("metrics")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(args.out), metadata=meta)
    size_mib = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size_mib:.1f} MiB, step {meta['step']}, {meta['metrics']})")


if __name__ == "__main__":
    main()
