"""Write tiny format-v1 traces with h5py from numpy arrays: no torch, no recorder.

`write_trace` is the one entry point; other test suites (reports, experiments) reuse it.
Only the required columns must be given; the rest get the values the recorder would write
(`visit_start` from the batch sizes, `loss_mean` from the visits, zeros elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["TINY_LAYERS", "TINY_STEPS", "TINY_VISITS", "write_tiny_trace", "write_trace"]

_FLOAT32 = {"loss", "p_target", "margin", "input_sq", "input_grad_sq", "grad_sq", "alignment"}
_FLOAT64 = {"lr", "loss_mean", "time", "accuracy"}


def _column(group: h5py.Group, name: str, values: Any) -> None:
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], str):
        data = np.asarray(values, dtype=object)
        dtype: Any = h5py.string_dtype("utf-8")
    else:
        data = np.asarray(values)
        float32 = name in _FLOAT32 and group.name in ("/visits", "/steps")
        if float32 or data.dtype == np.float32:
            dtype = np.float32
        elif name in _FLOAT64 or data.dtype.kind == "f":
            dtype = np.float64
        elif data.dtype.kind == "b":
            dtype = np.int8
        elif data.dtype.kind in "iu":
            dtype = np.int64
        else:
            dtype = h5py.string_dtype("utf-8")
            data = data.astype(object)
    maxshape = (None, *data.shape[1:])
    chunks = (max(1, min(len(data), 1024)), *data.shape[1:]) if len(data) else True
    group.create_dataset(
        name,
        data=data.astype(dtype) if dtype is not object else data,
        dtype=dtype,
        maxshape=maxshape,
        chunks=chunks,
        compression="gzip",
        compression_opts=1,
        shuffle=True,
    )


def write_trace(
    path: str | Path,
    *,
    layers: Sequence[str] | Mapping[str, Sequence[Any]],
    steps: Mapping[str, Any],
    visits: Mapping[str, Any],
    evals: Mapping[str, Any] | None = None,
    sample_info: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    reduction: str = "mean",
    closed: bool = True,
    rank: int = 0,
    world_size: int = 1,
    run_id: str = "0123abcd",
) -> Path:
    """Write a samplescope trace (format version 1) and return its path.

    Args:
        path: file to create (overwritten).
        layers: layer names (kind `Linear`, 10 parameters, method `identity`), or a mapping
            with columns `name` and optionally `kind`, `n_params`, `method`.
        steps: columns of /steps; `step`, `epoch`, `lr`, `batch_size` are required,
            `visit_start`, `loss_mean`, `time`, `n_nonfinite`, `grad_sq` default.
        visits: columns of /visits; `step`, `sample_id`, `loss`, `grad_sq` ([visits, layers])
            are required; `target`, `pred`, `p_target`, `margin`, `input_sq`,
            `input_grad_sq`, `alignment` are written when given.
        evals: columns of /evals (`step`, `epoch`, `split`, `loss`, `accuracy`), if any.
        sample_info: columns of /sample_info (`sample_id` plus any others), if any.
        attrs: root attributes overriding the defaults (e.g. `format_version`).
        reduction: the root `reduction` attribute, "mean" or "sum".
        closed: the /status/closed flag.
        rank, world_size, run_id: shard attributes.
    """
    path = Path(path)
    if not isinstance(layers, Mapping):
        layers = {"name": list(layers)}
    names = list(layers["name"])
    n_layers = len(names)
    layer_cols = {
        "name": names,
        "kind": list(layers.get("kind", ["Linear"] * n_layers)),
        "n_params": np.asarray(layers.get("n_params", [10] * n_layers), dtype=np.int64),
        "method": list(layers.get("method", ["identity"] * n_layers)),
    }
    step_cols = {k: np.asarray(v) for k, v in steps.items()}
    visit_cols = {k: np.asarray(v) for k, v in visits.items()}
    n_steps = len(step_cols["step"])
    batch = step_cols["batch_size"].astype(np.int64)
    step_cols.setdefault(
        "visit_start",
        np.concatenate([[0], np.cumsum(batch)[:-1]]).astype(np.int64)
        if n_steps
        else np.zeros(0, np.int64),
    )
    if "loss_mean" not in step_cols:
        loss = visit_cols["loss"].astype(np.float64)
        step_cols["loss_mean"] = np.array(
            [
                loss[s : s + b].mean() if b else np.nan
                for s, b in zip(step_cols["visit_start"], batch, strict=True)
            ],
            dtype=np.float64,
        )
    step_cols.setdefault("time", 1.7e9 + np.arange(n_steps, dtype=np.float64))
    step_cols.setdefault("n_nonfinite", np.zeros(n_steps, dtype=np.int64))
    step_cols.setdefault("grad_sq", np.zeros((n_steps, n_layers), dtype=np.float32))
    root = {
        "format": "samplescope-trace",
        "format_version": 1,
        "created": "2025-01-01T00:00:00Z",
        "samplescope_version": "0.1.0",
        "torch_version": "2.13.0",
        "run_id": run_id,
        "rank": rank,
        "world_size": world_size,
        "reduction": reduction,
        "optimizer": "SGD",
        "optimizer_hparams": json.dumps(
            {"lr": float(step_cols["lr"][0]) if n_steps else 0.1, "momentum": 0.0}
        ),
        "config": json.dumps({"seed": 0}),
        "model": "TinyNet",
        "options": json.dumps({"alignment": "alignment" in visit_cols}),
    }
    root.update(attrs or {})
    with h5py.File(path, "w", libver="latest") as f:
        for key, value in root.items():
            f.attrs[key] = value
        status = f.create_group("status")
        status["closed"] = np.array([1 if closed else 0], dtype=np.int8)
        status["n_errors"] = np.array([0], dtype=np.int64)
        for name, cols in (
            ("layers", layer_cols),
            ("steps", step_cols),
            ("visits", visit_cols),
            ("evals", evals),
            ("sample_info", sample_info),
        ):
            if cols is None:
                continue
            group = f.create_group(name)
            for col, values in cols.items():
                _column(group, col, values)
    return path


# The tiny trace every hand-computed test uses (docs in tests/analysis/test_scores.py):
# 2 layers (n_params 4 and 2), 4 samples, 2 epochs of 2 steps of batch 2, reduction mean,
# lr 0.5 in epoch 0 and 0.25 in epoch 1, so lr·s = 0.25 then 0.125.
TINY_LAYERS = {
    "name": ["enc", "head"],
    "kind": ["Linear", "Linear"],
    "n_params": [4, 2],
    "method": ["identity", "identity"],
}
TINY_STEPS = {
    "step": [0, 1, 2, 3],
    "epoch": [0, 0, 1, 1],
    "lr": [0.5, 0.5, 0.25, 0.25],
    "batch_size": [2, 2, 2, 2],
}
TINY_VISITS = {
    "step": [0, 0, 1, 1, 2, 2, 3, 3],
    "sample_id": [0, 1, 2, 3, 3, 0, 1, 2],
    "loss": [2.0, 1.0, 0.5, 3.0, 2.5, 1.5, 0.2, 0.1],
    "grad_sq": [[4, 0], [1, 1], [0, 4], [2, 7], [8, 0], [0, 0], [4, 4], [16, 0]],
    "target": [0, 1, 0, 1, 1, 0, 1, 0],
    "pred": [1, 1, 0, 0, 1, 0, 0, 0],
    "p_target": [0.2, 0.5, 0.6, 0.1, 0.4, 0.5, 0.3, 0.9],
    "margin": [-1.0, 0.5, 1.0, -2.0, 0.2, 0.1, -0.5, 3.0],
    "input_sq": [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 2.0, 3.0],
}
OUTPUT_COLUMNS = ("target", "pred", "p_target", "margin")


def write_tiny_trace(path: str | Path, *, outputs: bool = True, **kwargs: Any) -> Path:
    """The tiny hand-computed trace; `outputs=False` drops target/pred/p_target/margin."""
    visits = {k: v for k, v in TINY_VISITS.items() if outputs or k not in OUTPUT_COLUMNS}
    kwargs.setdefault(
        "evals",
        {
            "step": [2, 4],
            "epoch": [0, 1],
            "split": ["test", "test"],
            "loss": [1.5, 0.9],
            "accuracy": [0.5, 0.75],
        },
    )
    return write_trace(path, layers=TINY_LAYERS, steps=TINY_STEPS, visits=visits, **kwargs)
