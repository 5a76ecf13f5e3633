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
    if isinstance(sample_ids, Tensor):
        if sample_ids.is_floating_point():
            msg = f"sample ids must be integers, got a {sample_ids.dtype} tensor"
            raise RecorderError(msg)
        return sample_ids.detach().cpu().reshape(-1).to(torch.int64).numpy()
    array = np.asarray(sample_ids)
    if array.dtype.kind not in "iu":
        msg = f"sample ids must be integers, got {array.dtype}"
        raise RecorderError(msg)
    return array.reshape(-1).astype(np.int64)


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
    """pred, p_target, margin and el2n from raw logits, for many steps' visits at once.

    el2n is ‖softmax(logits) − onehot(target)‖₂ (Paul et al., 2021), exact: the writer sees
    every logit, the trace keeps only these columns.
    """
    if table != "visits" or "_logits" not in columns:
        return columns
    columns = dict(columns)
    logits = columns.pop("_logits")
    rows = np.arange(len(logits))
    target = columns["target"]
    target_logit = logits[rows, target]
    top = logits.max(1)
    with np.errstate(all="ignore"):  # non-finite logits are recorded as they come out
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(1))
        others = logits.copy()
        others[rows, target] = -np.inf
        columns["pred"] = logits.argmax(1).astype(np.int64)
        columns["p_target"] = np.exp(target_logit - log_norm).astype(np.float32)
        columns["margin"] = (target_logit - others.max(1)).astype(np.float32)
        error = np.exp(logits - log_norm[:, None])
        error[rows, target] -= 1.0
        columns["el2n"] = np.sqrt(np.square(error).sum(1)).astype(np.float32)
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
