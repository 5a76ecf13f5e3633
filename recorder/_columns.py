"""Turning one step's tensors into the trace's columns, and checking what the user passed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samplescope.recorder.errors import RecorderError

__all__ = [
    "as_ids",
    "batch_sq_norms",
    "check_choice",
    "check_result",
    "check_targets",
    "derive_outputs",
    "jsonable",
    "np32",
    "sample_info_arrays",
    "sq_norm",
]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        msg = f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}"
        raise RecorderError(msg)


def as_ids(sample_ids: Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    """Sample ids as int64, refusing what would silently change meaning on the way.

    Booleans are not ids, and a uint64 above 2**63 - 1 (or any negative id) would be
    stored as a different, negative number.
    """
    if isinstance(sample_ids, Tensor):
        if sample_ids.is_floating_point() or sample_ids.is_complex():
            msg = f"sample ids must be integers, got a {sample_ids.dtype} tensor"
            raise RecorderError(msg)
        if sample_ids.dtype == torch.bool:
            msg = "sample ids must be integers, got a bool tensor"
            raise RecorderError(msg)
        array = sample_ids.detach().cpu().reshape(-1).numpy()
    else:
        array = np.asarray(sample_ids)
        if array.dtype.kind not in "iu":
            kind = "bool" if array.dtype.kind == "b" else str(array.dtype)
            msg = f"sample ids must be integers, got {kind}"
            raise RecorderError(msg)
        array = array.reshape(-1)
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        msg = f"sample id {array.max()} does not fit in int64; use ids below 2**63"
        raise RecorderError(msg)
    ids = array.astype(np.int64)
    if ids.size and ids.min() < 0:
        msg = f"sample ids must be non-negative, got {ids.min()}"
        raise RecorderError(msg)
    return ids


def check_targets(targets: Tensor, n_classes: int) -> np.ndarray:
    """Targets as int64 class indices in [0, n_classes)."""
    values = targets.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        bad = values.min() if values.min() < 0 else values.max()
        msg = f"target {bad} is not a class index of logits with {n_classes} classes"
        raise RecorderError(msg)
    return values


def check_result(name: str, result: Any, n: int) -> None:
    if result.error is not None:
        msg = f"layer {name!r}: {result.error}"
        raise RecorderError(msg) from result.error
    if result.grad_sq is None:
        msg = f"layer {name!r} received no gradient in this step; did the forward pass use it?"
        raise RecorderError(msg)
    if result.grad_sq.shape != (n,):
        msg = f"layer {name!r} saw a batch of {result.grad_sq.shape[0]} but backward got {n} losses"
        raise RecorderError(msg)


def batch_sq_norms(grads: list[list[Tensor]]) -> np.ndarray:
    """‖G_l‖² per layer, from each layer's parameter gradients of this step."""
    flat = [g for layer in grads for g in layer]
    if any(g.is_sparse for g in flat):
        return np.array([sum(sq_norm(g) for g in layer) for layer in grads], dtype=np.float32)
    # One fused call for every parameter of the model, then a sum per layer.
    norms = torch.stack(torch._foreach_norm(flat)).double().square().numpy() if flat else []
    bounds = np.cumsum([0, *(len(layer) for layer in grads)])
    return np.array(
        [float(np.sum(norms[lo:hi])) for lo, hi in itertools.pairwise(bounds)],
        dtype=np.float32,
    )


def sq_norm(t: Tensor) -> float:
    # One BLAS dot: several times faster than square().sum() on large layers.
    if t.is_sparse:  # Embedding(sparse=True)
        t = t.coalesce().values()
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def np32(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def derive_outputs(table: str, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pred, p_target and margin from raw logits, for many steps' visits at once.

    Rows whose target is negative had no logits: they get the documented missing values
    (pred -1, p_target and margin NaN).
    """
    if table != "visits" or "_logits" not in columns:
        return columns
    columns = dict(columns)
    logits = columns.pop("_logits")
    target = columns["target"]
    n = len(target)
    pred = np.full(n, -1, dtype=np.int64)
    p_target = np.full(n, np.nan, dtype=np.float32)
    margin = np.full(n, np.nan, dtype=np.float32)
    known = np.flatnonzero(target >= 0)
    if known.size and logits.shape[1]:
        logits = logits[known]
        rows = np.arange(known.size)
        t = target[known]
        target_logit = logits[rows, t]
        top = logits.max(1)
        with np.errstate(all="ignore"):  # non-finite logits are recorded as they come out
            log_norm = top + np.log(np.exp(logits - top[:, None]).sum(1))
            others = logits.copy()
            others[rows, t] = -np.inf
            pred[known] = logits.argmax(1)
            p_target[known] = np.exp(target_logit - log_norm)
            margin[known] = target_logit - others.max(1)
    columns["pred"] = pred
    columns["p_target"] = p_target
    columns["margin"] = margin
    return columns


def sample_info_arrays(info: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    if info is None:
        return None
    arrays = {
        name: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
        for name, v in info.items()
    }
    if "sample_id" not in arrays:
        msg = "sample_info needs a 'sample_id' column naming the sample of each row"
        raise RecorderError(msg)
    lengths = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        msg = f"sample_info columns differ in length: {lengths}"
        raise RecorderError(msg)
    return arrays


def jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return repr(value)
