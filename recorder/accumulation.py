"""Gradient accumulation: K micro-batches recorded as one optimizer step.

With ``Recorder(..., accumulation_steps=K)`` every ``rec.backward`` call is one micro-batch.
It back-propagates ``reduce(losses) / K``, as the usual accumulation loop does, so the
parameters' gradients are bit for bit those of that loop. Each micro-batch's rows are
built as a step's are (per-sample norms divided by the micro-batch's own scale, so they
are the norms of each sample's own loss) and held here until the optimizer step is over;
then they become one /steps row (the optimizer step) and its visits, with two extra
columns: ``micro`` (the micro-batch's index within the step) and ``scale`` (the weight
of the sample's loss in the back-propagated loss, e.g. 1/(K·B) for a mean).

The step's batch gradient is the accumulated one: its squared norms are read from the
parameters' ``.grad`` after the micro-batch that closes the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from samplescope.recorder._columns import StepFrame, StepRows, param_norms
from samplescope.recorder.errors import RecorderError

__all__ = ["AccumulatedStep", "check_accumulation_steps", "check_loss_scale", "grad_norms"]


def check_accumulation_steps(value: object, *, alignment: bool, reference: bool = False) -> int:
    """``accumulation_steps`` as an int >= 1; alignment cannot be exact with K > 1.

    ⟨g_i, G⟩ needs the whole step's gradient G, known only after the last micro-batch,
    when the earlier micro-batches' per-sample factors are gone (keeping them would cost
    K times a step's activations).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"accumulation_steps must be an integer >= 1, not {value!r}"
        raise RecorderError(msg)
    if value > 1 and alignment:
        msg = (
            "alignment=True cannot be recorded exactly with accumulation_steps > 1 (the step's "
            "gradient is known only after its last micro-batch); record alignment without "
            "accumulation"
        )
        raise RecorderError(msg)
    if value > 1 and reference:
        # val_effect's scale and its every-k-th-step estimate assume one backward per step.
        msg = "reference= (validation attribution) is not supported with accumulation_steps > 1"
        raise RecorderError(msg)
    return value


def check_loss_scale(value: object, accumulation_steps: int) -> float | None:
    """A per-call ``loss_scale``: None, or a positive finite number under accumulation.

    Only with ``accumulation_steps`` > 1, whose trace stores each visit's weight
    (`/visits/scale`); without it readers take 1/batch_size, and importance would be off
    by the factor.
    """
    if value is None:
        return None
    if accumulation_steps == 1:
        msg = (
            "loss_scale is for gradient accumulation: pass Recorder(..., accumulation_steps=K), "
            "or pass unscaled losses"
        )
        raise RecorderError(msg)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"loss_scale must be a positive number, not {value!r}"
        raise RecorderError(msg)
    scale = float(value)
    if not (np.isfinite(scale) and scale > 0):
        msg = f"loss_scale must be a positive finite number, not {value!r}"
        raise RecorderError(msg)
    return scale


def grad_norms(params: Iterable[Mapping[str, nn.Parameter]]) -> tuple[Tensor, tuple[int, ...]]:
    """‖.grad‖ of every layer's parameters, as `param_norms` gives them, and counts per layer.

    Read after a micro-batch's backward, ``.grad`` holds the gradient accumulated so far;
    after the step's last micro-batch it is the gradient the optimizer step applies.
    """
    grads = [[p.grad for p in layer.values() if p.grad is not None] for layer in params]
    with torch.no_grad():
        return param_norms(grads), tuple(len(g) for g in grads)


@dataclass
class AccumulatedStep:
    """The micro-batches of the optimizer step being accumulated."""

    parts: list[tuple[StepRows, StepFrame]] = field(default_factory=list)
    micro: list[int] = field(default_factory=list)  # each part's backward call in the step
    calls: int = 0  # backward calls in this step, recorded or not
    failed: bool = False  # a micro-batch's recording failed: the step is not written

    def add(self, rows: StepRows, frame: StepFrame) -> None:
        self.parts.append((rows, frame))
        self.micro.append(self.calls)  # a call that recorded nothing still counts

    def visits(self) -> dict[str, np.ndarray]:
        """Every micro-batch's /visits rows in order, with ``micro`` and ``scale``."""
        parts = [(rows.visits(), frame) for rows, frame in self.parts]
        out: dict[str, np.ndarray] = {}
        for name in parts[0][0]:
            values = [v[name] for v, _ in parts]
            out[name] = _pad_logits(values) if name == "_logits" else np.concatenate(values)
        sizes = [frame.sample_id.size for _, frame in parts]
        out["micro"] = np.repeat(np.asarray(self.micro, dtype=np.int64), sizes)
        out["scale"] = np.repeat(np.asarray([f.scale for _, f in parts], dtype=np.float64), sizes)
        return out

    def steps(self) -> dict[str, np.ndarray]:
        """One /steps row: the optimizer step, with the accumulated gradient's norms."""
        rows = [part.steps() for part, _ in self.parts]
        losses = np.concatenate([part.visits()["loss"] for part, _ in self.parts])
        return {
            "step": rows[0]["step"],
            "epoch": rows[0]["epoch"],
            "lr": rows[-1]["lr"],
            "batch_size": np.array([sum(int(r["batch_size"][0]) for r in rows)], dtype=np.int64),
            "loss_mean": np.array([losses.mean(dtype=np.float64)]),
            "time": rows[-1]["time"],
            "n_nonfinite": np.array([sum(int(r["n_nonfinite"][0]) for r in rows)], dtype=np.int64),
            # Read from .grad after the last micro-batch: the whole step's gradient.
            "grad_sq": rows[-1]["grad_sq"],
        }


def _pad_logits(parts: list[np.ndarray]) -> np.ndarray:
    # Micro-batches without logits (or with fewer classes) are padded with -inf, which
    # changes neither the softmax nor the arg-max (as the writer does across steps).
    width = max(p.shape[1] for p in parts)
    return np.concatenate(
        [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-np.inf) for p in parts]
    )
