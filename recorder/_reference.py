"""Validation attribution: the gradient of a fixed held-out batch, for ⟨g(i,l), g_val(l)⟩.

Every ``every`` recorded steps the recorder asks `ReferenceBatch.gradients` for g_val, the
gradient of the held-out batch's mean loss at the step's parameters (after the training
backward, before the optimizer step), and each observer dots its samples' contributions
with it through the same exact identities as ``alignment`` (no per-sample gradient is
materialised). Nothing of the training step is touched:

- the forward runs through ``torch.func.functional_call`` on detached copies of the
  parameters, so no ``.grad`` changes and no parameter hook fires;
- the model runs in eval mode (every module's flag restored afterwards): the validation
  loss is the one an evaluation measures, dropout draws nothing and BatchNorm uses (and
  never updates) its running statistics; buffers are passed as clones besides, so a module
  that updates a buffer even in eval mode cannot change the model;
- the random number generators are forked around it, so a loss function that draws
  random numbers leaves the training stream where it was;
- observers see it as a replayed forward (`replaying`), so nothing of it is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from samplescope.recorder.errors import RecorderError
from samplescope.recorder.layers.base import replaying

__all__ = ["ReferenceBatch", "ReferenceLoss"]

# (model, x, y) -> per-sample losses [N], or (losses, logits): as `score_checkpoint` takes.
ReferenceLoss = Callable[[nn.Module, Any, Any], Any]


class ReferenceBatch:
    """A fixed held-out batch, its loss function and how often its gradient is measured."""

    def __init__(self, batch: Any, loss_fn: ReferenceLoss | None, every: int) -> None:
        try:
            x, y = batch
        except (TypeError, ValueError):
            msg = "reference must be an (x_val, y_val) pair, e.g. one held-out batch"
            raise RecorderError(msg) from None
        if loss_fn is None or not callable(loss_fn):
            msg = (
                "reference needs reference_loss=fn with fn(model, x, y) -> per-sample losses "
                "(or (losses, logits)), as score_checkpoint takes"
            )
            raise RecorderError(msg)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            msg = f"reference_every must be a positive integer, not {every!r}"
            raise RecorderError(msg)
        self.x, self.y = x, y
        self.loss_fn = loss_fn
        self.every = every

    @classmethod
    def of(cls, batch: Any, loss_fn: ReferenceLoss | None, every: int) -> ReferenceBatch | None:
        """None without a batch (``reference=None``), else the checked `ReferenceBatch`."""
        return None if batch is None else cls(batch, loss_fn, every)

    def due(self, step: int) -> bool:
        """Whether the recorded step ``step`` measures the reference gradient."""
        return step % self.every == 0

    def gradients(self, model: nn.Module) -> dict[int, Tensor]:
        """g_val by ``id(parameter)``: ∇ mean(loss_fn(model, x, y)) at the current parameters.

        Raises:
            RecorderError: the loss function failed or did not return per-sample losses
                that depend on the parameters.
        """
        named = dict(model.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        copies = {n: p.detach().requires_grad_(True) for n, p in trainable.items()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        modes = [(m, m.training) for m in model.modules()]
        wrapper = _LossOf(model, self.loss_fn)
        values = {f"model.{n}": v for n, v in {**copies, **buffers}.items()}
        try:
            model.eval()
            with _forked_rng(trainable.values()), torch.enable_grad(), replaying():
                try:
                    out = torch.func.functional_call(wrapper, values, (self.x, self.y))
                except Exception as error:
                    msg = f"reference_loss failed on the reference batch: {error}"
                    raise RecorderError(msg) from error
                losses = out[0] if isinstance(out, tuple) else out
                if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.numel():
                    shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)
                    msg = f"reference_loss must return per-sample losses [N], got {shape}"
                    raise RecorderError(msg)
                if not losses.requires_grad:
                    msg = "reference_loss returned losses that do not depend on the parameters"
                    raise RecorderError(msg)
                grads = torch.autograd.grad(losses.mean(), list(copies.values()), allow_unused=True)
        finally:
            for module, training in modes:
                module.training = training
        return {
            id(trainable[n]): (g.detach() if g is not None else torch.zeros_like(copies[n]))
            for n, g in zip(copies, grads, strict=True)
        }


class _LossOf(nn.Module):
    """``loss_fn(model, x, y)`` as a module, so functional_call can swap the parameters."""

    def __init__(self, model: nn.Module, loss_fn: ReferenceLoss) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, x: Any, y: Any) -> Any:
        return self._loss_fn(self.model, x, y)


def _forked_rng(params: Any) -> Any:
    devices = {p.device for p in params}
    accelerators = [d for d in devices if d.type != "cpu"]
    if not accelerators:
        return torch.random.fork_rng(devices=[])
    kind = accelerators[0].type
    indices = sorted({d.index or 0 for d in accelerators if d.type == kind})
    return torch.random.fork_rng(devices=indices, device_type=kind)
