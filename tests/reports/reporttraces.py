"""Traces for the report tests, written with h5py alone (via tests/analysis/tracefiles.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import write_trace

__all__ = ["write_no_outputs_trace"]


def write_no_outputs_trace(
    path: Path, n_samples: int = 60, epochs: int = 3, batch: int = 20
) -> Path:
    """A trace of per-sample losses and norms only: no logits/targets, no thumbnails."""
    rng = np.random.default_rng(0)
    per_epoch = n_samples // batch
    n_steps = epochs * per_epoch
    sample_id = np.concatenate([rng.permutation(n_samples) for _ in range(epochs)])
    epoch = np.repeat(np.arange(epochs), n_samples)
    loss = (rng.uniform(0.1, 2.0, n_samples)[sample_id] / (1 + epoch)).astype(np.float32)
    return write_trace(
        path,
        layers={"name": ["enc", "mid", "head"], "n_params": [40, 30, 12]},
        steps={
            "step": np.arange(n_steps),
            "epoch": np.repeat(np.arange(epochs), per_epoch),
            "lr": np.full(n_steps, 0.1),
            "batch_size": np.full(n_steps, batch),
        },
        visits={
            "step": np.repeat(np.arange(n_steps), batch),
            "sample_id": sample_id,
            "loss": loss,
            "grad_sq": (loss[:, None] * rng.uniform(0.5, 2, (len(loss), 3))).astype(np.float32),
        },
    )
