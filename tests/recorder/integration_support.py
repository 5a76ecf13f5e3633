"""What the framework adapters' tests share: a tiny classifier, its data, the trace's rows."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

N_SAMPLES, FEATURES, CLASSES = 24, 5, 3


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def classification_data() -> tuple[Tensor, Tensor, Tensor]:
    """Features, labels and sample ids (ids offset from the row numbers, so a mix-up shows)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)
    return x, y, torch.arange(N_SAMPLES) + 1000


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"parameter {name} differs from the unrecorded run"


def visits(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return {key: f["visits"][key][:] for key in f["visits"]}


def steps(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return {key: f["steps"][key][:] for key in f["steps"]}
