"""Shared fixtures for the attribution tests: one real (random-weight) tiny open_clip model per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attribution.models import TINY_MODEL, LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """exclip-tiny with seeded random weights (no weights can be downloaded here)."""
    torch.manual_seed(0)
    return load_model(TINY_MODEL, None)


@pytest.fixture(scope="session")
def tiny_state_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A state_dict of a fresh random exclip-tiny saved with torch.save, and the saved tensors."""
    torch.manual_seed(1234)
    state = load_model(TINY_MODEL, None).model.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "exclip-tiny-random.pt"
    torch.save(state, path)
    return path, {k: v.clone() for k, v in state.items()}
