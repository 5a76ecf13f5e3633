"""Turning one step's tensors into the trace's columns, and checking what the user passed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samplescope.recorder._transfer import HostTransfer, NonfiniteCounter
from samplescope.recorder.errors import RecorderError

__all__ = [
    "StepFrame",
    "StepRows",
    "as_ids",
    "check_choice",
    "check_result",
    "derive_outputs",
    "jsonable",
    "param_norms",
    "sample_info_arrays",
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
    visit_start: int
    layer_sizes: tuple[int, ...]  # parameter gradients per layer, for `param_norms`
    input_sq: bool  # the input norm was measured (else NaN by definition, not a fault)
    input_grad_sq: bool | None  # None: not asked for; False: asked, not measurable


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
            "visit_start": np.array([frame.visit_start], dtype=np.int64),
            "n_nonfinite": np.array([nonfinite], dtype=np.int64),
            "grad_sq": np.array(
                [[float(np.sum(norms[lo:hi])) for lo, hi in itertools.pairwise(bounds)]],
                dtype=np.float32,
            ),
        }
        return visits, steps


def derive_outputs(table: str, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pred, p_target and margin from raw logits, for many steps' visits at once."""
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
