"""Exact float32 inside the engine: TensorFloat-32 and other reduced-precision float32 math turned off.

PyTorch may compute float32 matrix products and convolutions with fewer mantissa bits: TF32 (10 bits)
for cuDNN convolutions by default and for cuBLAS matmuls when enabled, bfloat16 in oneDNN on CPU after
``torch.set_float32_matmul_precision("medium")``. Either breaks the engine's 1e-4 agreement with the
reference, so every explanation runs inside :func:`exact_float32`, which sets these backends to IEEE
float32 and gives the caller's settings back afterwards, on error too. Reduced precision is chosen
explicitly with the explainer's ``precision`` instead.

The flags are process-wide: another thread computing meanwhile also runs in IEEE float32, and reading
the legacy ``allow_tf32`` flags inside the block raises (PyTorch refuses a mix of its two flag APIs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# What the engine sets every float32 backend to. bench/gpu_check.py sets "tf32" here for one run to
# measure the error TF32 would cause.
IEEE = "ieee"


def float32_backends() -> dict[str, Any]:
    """The backends whose ``fp32_precision`` decides how float32 products and convolutions are computed."""
    backends = torch.backends
    return {
        "cuda.matmul": backends.cuda.matmul,
        "cudnn.conv": backends.cudnn.conv,  # type: ignore[attr-defined]
        "mkldnn.matmul": backends.mkldnn.matmul,  # type: ignore[attr-defined]
        "mkldnn.conv": backends.mkldnn.conv,  # type: ignore[attr-defined]
    }


def float32_precisions() -> dict[str, str]:
    """Each backend's current float32 precision ("ieee", "tf32", "bf16", or "none": inherited)."""
    return {name: str(backend.fp32_precision) for name, backend in float32_backends().items()}


@contextmanager
def exact_float32() -> Iterator[None]:
    """Run the block with every float32 product and convolution in IEEE float32; restore after."""
    backends = float32_backends()
    saved = {name: backend.fp32_precision for name, backend in backends.items()}
    try:
        for backend in backends.values():
            backend.fp32_precision = IEEE
        yield
    finally:
        for name, backend in backends.items():
            backend.fp32_precision = saved[name]
