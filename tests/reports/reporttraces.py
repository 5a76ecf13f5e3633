"""Traces for the report tests, written with h5py alone (via tests/analysis/tracefiles.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import write_trace

__all__ = ["write_no_outputs_trace", "write_outputs_trace"]


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


def write_outputs_trace(
    path: Path,
    *,
    n_samples: int = 60,
    epochs: int = 3,
    batch: int = 20,
    layer_names: list[str] | None = None,
    class_names: list[str] | None = None,
    lrs: list[float] | None = None,
    bad: tuple[int, ...] = (7,),
    flags: bool = False,
    alignment: bool = False,
) -> Path:
    """A trace with logits/targets (3 classes) where the samples in `bad` behave as
    mislabeled ones do: low p(label), negative margins, wrong predictions, large gradients.

    Args:
        lrs: the learning rate of each epoch (default 0.1 throughout).
        flags: also write /sample_info with a boolean `flipped` column true for `bad`.
        alignment: also write a per-layer alignment column.
    """
    rng = np.random.default_rng(1)
    names = layer_names or ["enc", "mid", "head"]
    per_epoch = n_samples // batch
    n_steps = epochs * per_epoch
    sample_id = np.concatenate([rng.permutation(n_samples) for _ in range(epochs)])
    epoch = np.repeat(np.arange(epochs), n_samples)
    is_bad = np.isin(sample_id, bad)
    target = (np.arange(n_samples) % 3)[sample_id]
    p_target = np.where(is_bad, 0.05, rng.uniform(0.5, 0.99, len(sample_id)) * (1 + epoch) / epochs)
    p_target = np.clip(p_target, 0.01, 0.99)
    loss = (-np.log(p_target)).astype(np.float32)
    scale = np.where(is_bad, 20.0, 1.0)
    grad_sq = (scale * loss)[:, None] * rng.uniform(0.5, 2, (len(loss), len(names)))
    visits = {
        "step": np.repeat(np.arange(n_steps), batch),
        "sample_id": sample_id,
        "loss": loss,
        "grad_sq": grad_sq.astype(np.float32),
        "target": target,
        "pred": np.where(is_bad, (target + 1) % 3, target),
        "p_target": p_target.astype(np.float32),
        "margin": np.where(is_bad, -3.0, rng.uniform(0.1, 4, len(loss))).astype(np.float32),
    }
    if alignment:
        visits["alignment"] = rng.uniform(-1, 1, (len(loss), len(names))).astype(np.float32)
    lr_per_epoch = np.asarray(lrs or [0.1] * epochs, dtype=np.float64)
    config = {"seed": 0}
    if class_names is not None:
        config["class_names"] = class_names
    return write_trace(
        path,
        layers={"name": names, "n_params": [40 + i for i in range(len(names))]},
        steps={
            "step": np.arange(n_steps),
            "epoch": np.repeat(np.arange(epochs), per_epoch),
            "lr": np.repeat(lr_per_epoch, per_epoch),
            "batch_size": np.full(n_steps, batch),
        },
        visits=visits,
        sample_info=(
            {"sample_id": np.arange(n_samples), "flipped": np.isin(np.arange(n_samples), bad)}
            if flags
            else None
        ),
        attrs={"config": json.dumps(config)},
    )
