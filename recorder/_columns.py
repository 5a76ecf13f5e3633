"""Turning one step's tensors into the trace's columns, and checking what the user passed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samplescope.recorder import _transfer
from samplescope.recorder._transfer import HostTransfer, NonfiniteCounter
from samplescope.recorder.errors import RecorderError

__all__ = [
    "StepFrame",
    "StepRows",
    "as_ids",
    "check_choice",
    "check_result",
    "check_targets",
    "checkpoint_rows",
    "derive_outputs",
    "jsonable",
    "param_norms",
    "sample_info_arrays",
    "stack_grad_sq",
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


def check_targets(targets: Tensor, n_classes: int) -> Tensor:
    """Targets as an int64 copy; on the CPU, checked to be class indices in [0, n_classes).

    Targets on an accelerator are not read here (that would wait for the device every
    step): out-of-range ones get the documented missing outputs (`derive_outputs`).
    """
    copy = targets.detach().reshape(-1).to(torch.int64, copy=True)
    if not _transfer._needs_copy(copy) and copy.numel():
        low, high = (int(v) for v in torch.aminmax(copy))  # one pass, not two
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            msg = f"target {bad} is not a class index of logits with {n_classes} classes"
            raise RecorderError(msg)
    return copy


def check_result(name: str, result: Any, n: int) -> bool:
    """True when the layer has norms for this step; False when it received no gradient.

    A layer that got no gradient (left out of the loss, a branch not taken) records 0;
    one whose norm could not be computed is an error, and so is one whose parameters
    got a gradient that did not come through its output (the norm would be wrong).
    """
    if result.error is not None:
        msg = f"layer {name!r}: {result.error}"
        raise RecorderError(msg) from result.error
    if result.grad_sq is None:
        if result.batch_grad:
            msg = (
                f"layer {name!r}: its parameters received a gradient that did not pass "
                "through its output in this step, so its per-sample norm is unknown"
            )
            raise RecorderError(msg)
        return False
    if result.grad_sq.shape != (n,):
        msg = f"layer {name!r} saw a batch of {result.grad_sq.shape[0]} but backward got {n} losses"
        raise RecorderError(msg)
    return True


def stack_grad_sq(grad_sq: list[Tensor | None], n: int, device: torch.device) -> Tensor:
    """The layers' per-sample norms as one [N, L] tensor; None (no gradient) records 0.

    One stack for the whole step: at small batch sizes the per-call overhead, not the
    arithmetic, is what recording costs, so nothing here runs per layer unless needed
    (a zero column, a layer on another device).
    """
    where = next((g.device for g in grad_sq if g is not None), device)
    zeros = torch.zeros(n, device=where) if any(g is None for g in grad_sq) else None
    columns = [
        zeros if g is None else g if g.device == where and not g.requires_grad else g.detach()
        for g in grad_sq
    ]
    columns = [c if c.device == where else c.to(where) for c in columns]
    return torch.stack(columns, 1)


def param_norms(grads: list[list[Tensor]]) -> Tensor:
    """‖∂/∂p‖ of every parameter gradient of this step, in one tensor on their device.

    Not squared, and in the gradients' dtype: float64 is not on every device (MPS).
    `StepRows` squares them in float64 and sums them per layer on the writer thread.
    """
    flat = [g.coalesce().values() if g.is_sparse else g for layer in grads for g in layer]
    if not flat:
        return torch.zeros(0)
    device = flat[0].device
    if all(g.device == device for g in flat):
        norms = torch._foreach_norm(flat)  # one fused call for every parameter of the model
    else:  # a model spread over devices
        norms = [torch.linalg.vector_norm(g).to(device, non_blocking=True) for g in flat]
    return torch.stack(norms)


@dataclass(frozen=True)
class StepFrame:
    """What the training thread knows about a step without reading any tensor."""

    step: int
    epoch: int
    sample_id: np.ndarray
    scale: float  # 1/N for a mean reduction, 1 for a sum
    lr: float  # NaN when the learning rate is a tensor (then it is in the transfer)
    time: float
    layer_sizes: tuple[int, ...]  # parameter gradients per layer, for `param_norms`
    input_sq: bool  # the input norm was measured (else NaN by definition, not a fault)
    input_grad_sq: bool | None  # None: not asked for; False: asked, not measurable
    missing_outputs: bool = False  # no logits this step: the documented missing values
    reference: bool = False  # the trace has /visits/val_dot (NaN on steps not measured)


class StepRows:
    """One step's visits and steps rows, built from a `HostTransfer` on first read.

    The transfer holds ``loss``, ``grad_sq`` ([N, L], back-propagated units),
    ``param_norms`` (per parameter), and where present ``input_sq``, ``input_grad_sq``,
    ``alignment``, ``_logits``, ``target`` and ``lr``. Dividing by the reduction scale,
    summing per layer and counting non-finite values all happen here, on the writer thread.
    """

    def __init__(
        self, transfer: HostTransfer, frame: StepFrame, nonfinite: NonfiniteCounter
    ) -> None:
        self._transfer = transfer
        self._frame = frame
        self._nonfinite = nonfinite
        self._tables: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None

    def visits(self) -> dict[str, np.ndarray]:
        return self._build()[0]

    def steps(self) -> dict[str, np.ndarray]:
        return self._build()[1]

    def _build(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self._tables is None:
            self._tables = self._make(self._transfer.arrays())
        return self._tables

    def _make(
        self, a: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        frame = self._frame
        n = frame.sample_id.size
        scale_sq = frame.scale * frame.scale
        nan = np.full(n, np.nan, dtype=np.float32)
        visits = {
            "step": np.full(n, frame.step, dtype=np.int64),
            "sample_id": frame.sample_id,
            "loss": a["loss"].astype(np.float32, copy=False),
            "grad_sq": (a["grad_sq"].astype(np.float64) / scale_sq).astype(np.float32),
            "input_sq": a["input_sq"].astype(np.float32) if frame.input_sq else nan,
        }
        counted = ["loss", "grad_sq"] + (["input_sq"] if frame.input_sq else [])
        if "_logits" in a:
            # Raw logits: the writer derives the output columns for many steps at once.
            visits["_logits"] = a["_logits"]
            visits["target"] = a["target"]
        elif frame.missing_outputs:  # see derive_outputs
            visits["_logits"] = np.zeros((n, 0), dtype=np.float32)
            visits["target"] = np.full(n, -1, dtype=np.int64)
        if frame.input_grad_sq is not None:
            measured = frame.input_grad_sq
            visits["input_grad_sq"] = (
                (a["input_grad_sq"].astype(np.float64) / scale_sq).astype(np.float32)
                if measured
                else nan
            )
            counted += ["input_grad_sq"] if measured else []
        if "alignment" in a:
            visits["alignment"] = (a["alignment"].astype(np.float64) / frame.scale).astype(
                np.float32
            )
            counted.append("alignment")
        if "val_dot" in a:
            visits["val_dot"] = (a["val_dot"].astype(np.float64) / frame.scale).astype(np.float32)
            counted.append("val_dot")
        elif frame.reference:
            visits["val_dot"] = np.full((n, a["grad_sq"].shape[1]), np.nan, dtype=np.float32)
        nonfinite = sum(int(np.count_nonzero(~np.isfinite(visits[k]))) for k in counted)
        if "_logits" in a:  # a sample with non-finite logits has no p_target/margin
            nonfinite += 2 * int(np.count_nonzero(~np.isfinite(a["_logits"]).all(1)))
        self._nonfinite.add(frame.step, nonfinite)
        bounds = np.cumsum([0, *frame.layer_sizes])
        norms = np.square(a["param_norms"].astype(np.float64))
        lr = float(a["lr"]) if "lr" in a else frame.lr
        steps = {
            "step": np.array([frame.step], dtype=np.int64),
            "epoch": np.array([frame.epoch], dtype=np.int64),
            "lr": np.array([lr]),
            "batch_size": np.array([n], dtype=np.int64),
            "loss_mean": np.array([visits["loss"].mean(dtype=np.float64)]),
            "time": np.array([frame.time]),
            "n_nonfinite": np.array([nonfinite], dtype=np.int64),
            "grad_sq": np.array(
                [[float(np.sum(norms[lo:hi])) for lo, hi in itertools.pairwise(bounds)]],
                dtype=np.float32,
            ),
        }
        return visits, steps


def derive_outputs(table: str, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pred, p_target, margin and el2n from raw logits, for many steps' visits at once.

    el2n is ‖softmax(logits) − onehot(target)‖₂ (Paul et al., 2021), exact: the writer sees
    every logit, the trace keeps only these columns. Rows whose target is negative had no
    logits, and rows whose target is not a class of their logits (unchecked targets on an
    accelerator): both get the documented missing values (pred -1, the others NaN).
    """
    if table not in ("visits", "checkpoints") or "_logits" not in columns:
        return columns
    columns = dict(columns)
    logits = columns.pop("_logits")
    target = columns["target"]
    n = len(target)
    pred = np.full(n, -1, dtype=np.int64)
    p_target = np.full(n, np.nan, dtype=np.float32)
    margin = np.full(n, np.nan, dtype=np.float32)
    el2n = np.full(n, np.nan, dtype=np.float32)
    known = np.flatnonzero((target >= 0) & (target < logits.shape[1]))
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
            error = np.exp(logits - log_norm[:, None])
            error[rows, t] -= 1.0
            el2n[known] = np.sqrt(np.square(error).sum(1))
    columns["pred"] = pred
    columns["p_target"] = p_target
    columns["margin"] = margin
    columns["el2n"] = el2n
    return columns


def checkpoint_rows(
    parts: Sequence[StepRows], index: int, step: int, epoch: int
) -> dict[str, np.ndarray]:
    """One checkpoint's /checkpoints rows from its batches (raw logits, derived later).

    ``step`` is the number of training steps recorded before the checkpoint.
    """
    batches = [part.visits() for part in parts]
    n = sum(b["sample_id"].size for b in batches)
    width = max(b["_logits"].shape[1] for b in batches)
    # Batches whose logits have fewer classes (or none) are padded with -inf, which changes
    # neither the softmax nor the arg-max (as the writer does for /visits).
    logits = np.concatenate(
        [
            np.pad(
                b["_logits"].astype(np.float32, copy=False),
                ((0, 0), (0, width - b["_logits"].shape[1])),
                constant_values=-np.inf,
            )
            for b in batches
        ]
    )
    return {
        "checkpoint": np.full(n, index, dtype=np.int64),
        "step": np.full(n, step, dtype=np.int64),
        "epoch": np.full(n, epoch, dtype=np.int64),
        "sample_id": np.concatenate([b["sample_id"] for b in batches]),
        "loss": np.concatenate([b["loss"] for b in batches]),
        "grad_sq": np.concatenate([b["grad_sq"] for b in batches]),
        "_logits": logits,
        "target": np.concatenate([b["target"] for b in batches]),
    }


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
