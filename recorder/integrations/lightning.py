"""PyTorch Lightning: per-sample losses from `training_step`, recorded in `backward`.

    from samplescope.recorder.integrations.lightning import RecordedModule, RecorderCallback

    class Classifier(RecordedModule, L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            return self.recorded(losses, sample_ids=ids, logits=logits, targets=y)

    L.Trainer(callbacks=[RecorderCallback("runs/pl.h5")]).fit(Classifier(), loader)

Lightning's callbacks only ever see the reduced loss, so the recording happens in
`LightningModule.backward`, which `RecordedModule` overrides: it back-propagates the same
reduced loss through the recorder. `RecorderCallback` owns the `Recorder`: opened when
training starts (the optimizer exists then), closed when it ends or fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch import Tensor

from samplescope.recorder.integrations._common import (
    IntegrationError,
    check_accumulation,
    rank_path,
)
from samplescope.recorder.recorder import Recorder

__all__ = ["RecordedModule", "RecorderCallback"]


@dataclass
class _Pending:
    """What `recorded` saw in training_step, for the backward that follows."""

    loss: Tensor
    losses: Tensor
    sample_ids: Any
    logits: Tensor | None
    targets: Tensor | None


class RecorderCallback(pl.Callback):
    """Opens a `Recorder` of the LightningModule for the length of ``trainer.fit``.

    Args:
        path: the trace; ``{rank}`` in it is replaced by the process's global rank (one
            trace per rank under DDP, see docs/recorder.md).
        **recorder_options: keyword arguments for `Recorder` (``alignment=True``, ...).

    Raises:
        IntegrationError: when training starts, for settings the recorder cannot follow bit
            for bit: ``accumulate_grad_batches > 1`` (unless the Recorder accumulates over
            the same K), a gradient scaler (``precision="16-mixed"``), DeepSpeed, or a
            module that is not a `RecordedModule`.
    """

    def __init__(self, path: str | Path, **recorder_options: Any) -> None:
        self.path = str(path)
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, RecordedModule):
            msg = f"{type(pl_module).__name__} must derive from RecordedModule to be recorded "
            msg += "(class MyModule(RecordedModule, LightningModule))"
            raise IntegrationError(msg)
        if "DeepSpeed" in type(trainer.strategy).__name__:
            msg = "samplescope cannot record through DeepSpeed's own backward; use DDP"
            raise IntegrationError(msg)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            msg = (
                f"precision={trainer.precision!r} scales the loss before backward, which the "
                "recorder cannot undo; record with precision='bf16-mixed' or '32'"
            )
            raise IntegrationError(msg)
        options = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        options.update(self.recorder_options)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        path = rank_path(self.path, trainer.global_rank, trainer.world_size)
        recorder = Recorder(path, _trained_model(trainer, pl_module), optimizer, **options)
        check_accumulation(recorder, trainer.accumulate_grad_batches, "the Lightning Trainer")
        self.recorder = recorder.__enter__()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.set_epoch(trainer.current_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(None)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(None)  # a no-op unless fit ended without on_train_end

    def _close(self, exception: BaseException | None) -> None:
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        if exception is None:
            recorder.__exit__(None, None, None)
        else:
            recorder.__exit__(type(exception), exception, exception.__traceback__)


def _trained_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The module to record: under DDP the strategy's DistributedDataParallel wrapper.

    The recorder reads the batch gradient from DDP's reduction and refuses the bare module
    in a process group; any other strategy (one device) trains ``pl_module`` itself.
    """
    from torch.nn.parallel import DistributedDataParallel

    wrapped = getattr(trainer.strategy, "model", None)
    return wrapped if isinstance(wrapped, DistributedDataParallel) else pl_module


def _active_recorder(module: Any) -> Recorder | None:
    trainer = module._trainer  # None outside fit; `module.trainer` raises there
    if trainer is None:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, RecorderCallback) and callback.recorder is not None:
            return callback.recorder
    return None


class RecordedModule:
    """Mixin for a `LightningModule`: record the per-sample losses of `training_step`.

    Put it first among the bases. ``training_step`` returns ``self.recorded(losses, ...)``;
    without a `RecorderCallback` the module trains exactly as with ``losses.mean()``.
    """

    def recorded(
        self,
        losses: Tensor,
        sample_ids: Tensor | Sequence[int] | np.ndarray,
        logits: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> dict[str, Any]:
        """Return ``training_step``'s output for per-sample ``losses`` (shape [N]).

        Returns:
            ``{"loss": mean(losses), "losses": ..., "sample_ids": ...}`` (the sum with a
            Recorder of ``reduction="sum"``); Lightning back-propagates ``"loss"``.
        """
        recorder = _active_recorder(self)
        reduction = recorder.reduction if recorder is not None else "mean"
        loss = losses.mean() if reduction == "mean" else losses.sum()
        if recorder is not None:
            self._samplescope_step = _Pending(loss, losses, sample_ids, logits, targets)
        return {"loss": loss, "losses": losses.detach(), "sample_ids": sample_ids}

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Back-propagate ``loss``; while recording, through the Recorder."""
        pending: _Pending | None = getattr(self, "_samplescope_step", None)
        self._samplescope_step = None
        recorder = _active_recorder(self)
        if recorder is None:
            super().backward(loss, *args, **kwargs)  # type: ignore[misc]
            return
        if args:
            msg = "positional backward arguments cannot be passed on to Recorder.backward"
            raise IntegrationError(msg)
        if pending is None:
            msg = "training_step must return self.recorded(losses, sample_ids=...) while recording"
            raise IntegrationError(msg)
        # Lightning hands over `loss / accumulate_grad_batches`, then a precision plugin's
        # scaled copy; both were refused up front unless they leave the values as they are
        # (K = 1, no scaler), or the recorder divides by the same K. Comparing the values
        # here would read the device on every step.
        recorder.backward(
            pending.losses,
            sample_ids=pending.sample_ids,
            logits=pending.logits,
            targets=pending.targets,
            **kwargs,
        )
