"""How many tangent rows the engine holds at once, sized from the memory its device has free.

The engine pushes tangents through the blocks above the cut in passes; a pass of R tangent rows holds
about ``ROW_FACTOR`` MLP-hidden vectors per row (primal and tangent of the MLP's input, hidden layer
and output). Measured on the CPU, ViT-B-32 at block 4 (dense tangents through 7 blocks, MLP width
3072, float32): 4096 rows peaked 166 MB over the loaded model, 16384 rows 750 MB, i.e. 47.5 kB a row,
3.9 MLP vectors; ``ROW_FACTOR`` = 6 leaves room for the allocator.

On CUDA larger passes keep the device busy, so the budget is a share of the free device memory. On the
CPU a pass of 4096 rows is already as fast as a larger one, so the budget only ever shrinks below that
when little memory is free: a worker process then stays small beside its neighbours.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ROW_FACTOR = 6
MIN_TANGENTS = 64  # below this the passes' overhead dominates; a job that needs more memory fails
CPU_MAX_TANGENTS = 4096
CUDA_MAX_TANGENTS = 1 << 17
DEFAULT_MEMORY_FRACTION = 0.5  # of the free memory, for one pass


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes the device has free now: CUDA's own count, on the CPU Linux's MemAvailable; else None."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def widest_mlp(model: nn.Module) -> int:
    """The largest hidden width of any MLP in the model (both towers)."""
    modules = model.named_modules()
    # open_clip's blocks name their first MLP layer c_fc, timm's (and its attention pooling's) fc1.
    first_layers = ("c_fc", "fc1")
    widths = [
        m.out_features for name, m in modules if name.endswith(first_layers) and isinstance(m, nn.Linear)
    ]
    return max(widths, default=4 * 512)  # a model without open_clip's MLP names: ViT-B's width


def tangent_budget(
    mlp_width: int,
    device: torch.device,
    dtype: torch.dtype,
    fraction: float = DEFAULT_MEMORY_FRACTION,
    free_bytes: int | None = None,
) -> int:
    """Tangent rows per pass: ``fraction`` of the free memory over a row's cost (``mlp_width``: the
    model's :func:`widest_mlp`), within the device's bounds. ``free_bytes`` defaults to what
    :func:`free_memory_bytes` reads now."""
    cap = CUDA_MAX_TANGENTS if device.type == "cuda" else CPU_MAX_TANGENTS
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    if free is None:
        return cap
    row_bytes = ROW_FACTOR * mlp_width * torch.finfo(dtype).bits // 8
    return max(MIN_TANGENTS, min(cap, int(free * fraction) // row_bytes))
