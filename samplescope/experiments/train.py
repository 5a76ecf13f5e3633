"""One recorded training run on a named dataset: the engine behind train, demo and experiments."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from samplescope.errors import SamplescopeError
from samplescope.experiments.config import PRESETS, RunConfig
from samplescope.experiments.data import Dataset, load_dataset
from samplescope.experiments.models import make_model
from samplescope.recorder import Recorder

__all__ = [
    "PRESETS",
    "BatchPlan",
    "RunConfig",
    "RunResult",
    "TrainHook",
    "early_checkpoint",
    "evaluate",
    "train_run",
]

# Batches for one epoch: index arrays into the training set, drawn as the loop asks for
# them (an online sampler picks each batch after the previous step's feedback).
BatchPlan = Callable[[int, np.random.Generator], Iterable[Any]]


class TrainHook:
    """What an experiment adds to `train_run`'s loop; override the methods you need.

    `train_run` calls `attach` once the model is built, `after_step` after every optimizer
    step, and `detach` when the loop ends, exceptions included.
    """

    def attach(self, model: nn.Module) -> None:
        """Before the first step (e.g. register a forward hook on ``model``)."""

    def after_step(self, ids: np.ndarray, losses: Tensor, logits: Tensor) -> None:
        """After each step: the batch's sample ids, per-sample losses and logits (detached)."""

    def detach(self) -> None:
        """When training ends or fails: remove whatever `attach` added."""


@dataclass
class RunResult:
    path: Path | None
    config: RunConfig
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def log(self, train_accuracy: float, test_loss: float, test_accuracy: float) -> None:
        """One epoch's accuracies and test loss."""
        self.train_accuracy.append(train_accuracy)
        self.test_loss.append(test_loss)
        self.test_accuracy.append(test_accuracy)


def train_run(
    config: RunConfig,
    out: str | Path | None,
    *,
    data: Dataset | None = None,
    data_dir: str | Path | None = None,
    train_indices: np.ndarray | None = None,
    train_targets: Tensor | None = None,
    batch_plan: BatchPlan | None = None,
    init_state: dict[str, Tensor] | None = None,
    sample_info: dict[str, Any] | None = None,
    thumbnails: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    recorder_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    hooks: Sequence[TrainHook] = (),
    checkpoint_epochs: Sequence[int] = (),
) -> RunResult:
    """Train ``config`` with plain SGD, recording every sample at every step to ``out``.

    The one training loop: `samplescope train`, the demo and every experiment (recorded
    or not) run through it; what they add goes in through ``batch_plan`` and ``hooks``.

    Args:
        config: the run's settings.
        out: the trace to write; None trains without recording (for baselines and timing).
        data: an already loaded dataset (else ``load_dataset(config.dataset, data_dir)``,
            ``data_dir`` defaulting to ``config.data_dir``).
        train_indices: train on this subset of the training set (sample ids stay the
            original indices).
        train_targets: labels to train on instead of the dataset's (e.g. with noise).
        batch_plan: ``(epoch, rng) -> iterable of index arrays``; default: shuffled batches.
        init_state: a model state_dict to start from (same initialisation across runs).
        sample_info, thumbnails, recorder_options: passed to the Recorder.
        progress: show a progress bar over the run's batches (epoch, test accuracy).
        device: where the model and data live, e.g. ``"cuda"``; the trace is the same.
        hooks: `TrainHook`s called around the loop and after every step.
        checkpoint_epochs: after these epochs (0-based) score every training sample at the
            current parameters (`Recorder.score_checkpoint`: Data Diet's EL2N and GraNd);
            needs ``out``.
    """
    if data is None:
        where = config.data_dir if data_dir is None else data_dir
        data = load_dataset(config.dataset, where, seed=config.seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = make_model(config.model, data.input_shape, data.n_classes, config.hidden, config.depth)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    x, y = data.x_train, data.y_train if train_targets is None else train_targets
    x, y = x.to(device), y.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    ids = np.arange(len(x)) if train_indices is None else np.asarray(train_indices)
    if len(ids) == 0:
        msg = "no training samples left to train on"
        raise SamplescopeError(msg)
    plan = batch_plan or _shuffled(ids, config.batch_size)
    result = RunResult(None if out is None else Path(out), config)
    options = _recorder_options(recorder_options, out, checkpoint_epochs)
    recorder = None
    if out is not None:
        recorder = Recorder(
            out,
            model,
            optimizer,
            config=_trace_config(config, data),
            reduction=config.reduction,
            thumbnails=thumbnails,
            sample_info=sample_info,
            overwrite=overwrite,
            **options,
        )
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.enter_context(recorder)
        for hook in hooks:
            hook.attach(model)
            stack.callback(hook.detach)
        bar = _progress_bar(config, None if batch_plan else len(ids), progress)
        for epoch in range(config.epochs):
            model.train()
            if recorder is not None:
                recorder.set_epoch(epoch)
            correct = seen = 0
            for batch in plan(epoch, rng):
                index = torch.as_tensor(batch, dtype=torch.int64)
                correct += _step(model, optimizer, recorder, config.reduction, index, x, y, hooks)
                seen += len(index)
                bar.update(1)
            test_loss, test_acc = evaluate(model, x_test, y_test)
            result.log(correct / max(seen, 1), test_loss, test_acc)
            if recorder is not None:
                recorder.log_eval("test", loss=test_loss, accuracy=test_acc)
                if epoch in checkpoint_epochs:
                    recorder.score_checkpoint(_in_order(ids, x, y, 1000), _checkpoint_loss)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{config.epochs}",
                test_acc=f"{test_acc:.3f}",
                train_acc=f"{correct / max(seen, 1):.3f}",
            )
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recorder: Recorder | None,
    reduction: str,
    index: Tensor,
    x: Tensor,
    y: Tensor,
    hooks: Sequence[TrainHook],
) -> int:
    """One SGD step on the samples ``index``, recorded when ``recorder`` is given.

    Returns how many of the batch the model predicted right (before the step).
    """
    xb, yb = x[index.to(x.device)], y[index.to(y.device)]
    logits = model(xb)
    losses = F.cross_entropy(logits, yb, reduction="none")
    if recorder is not None:
        recorder.backward(losses, sample_ids=index, logits=logits, targets=yb)
    else:
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.after_step(index.numpy(), losses.detach(), logits.detach())
    return int((logits.argmax(1) == yb).sum())


def _progress_bar(config: RunConfig, n_train: int | None, progress: bool) -> Any:
    """One bar over every batch of the run, so a long epoch (a CNN's) still shows life;
    its length is known for the default shuffled batches (`n_train` samples)."""
    per_epoch = None if n_train is None else -(-n_train // config.batch_size)
    return tqdm(
        total=None if per_epoch is None else per_epoch * config.epochs,
        desc=f"train {config.dataset}/{config.model}",
        unit="batch",
        disable=not progress,
        leave=False,
    )


def _trace_config(config: RunConfig, data: Dataset) -> dict[str, Any]:
    """The run's settings as stored in the trace, plus the dataset's class names (an
    optional ``class_names`` entry that readers use for labels when present)."""
    stored = config.stored()
    if data.class_names is not None and len(data.class_names) == data.n_classes:
        stored["class_names"] = list(data.class_names)
    return stored


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return total_loss / max(len(x), 1), correct / max(len(x), 1)


def _recorder_options(
    options: dict[str, Any] | None, out: str | Path | None, checkpoint_epochs: Sequence[int]
) -> dict[str, Any]:
    if not checkpoint_epochs:
        return dict(options or {})
    if out is None:
        msg = "checkpoint_epochs needs a trace to write the checkpoint scores to"
        raise SamplescopeError(msg)
    return {**(options or {}), "checkpoints": True}


def _in_order(ids: np.ndarray, x: Tensor, y: Tensor, batch_size: int) -> Iterable[Any]:
    """The training samples in id order, unshuffled, as Data Diet scores them."""
    for start in range(0, len(ids), batch_size):
        index = torch.as_tensor(ids[start : start + batch_size], dtype=torch.int64)
        yield x[index.to(x.device)], y[index.to(y.device)], index


def _checkpoint_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits


def early_checkpoint(epochs: int) -> tuple[int, ...]:
    """The epoch after which experiments score Data Diet's checkpoint: a tenth of the way
    through training (Paul et al. score EL2N at epoch 20 of 200), at least one epoch in."""
    return (max(1, round(epochs / 10)) - 1,)


def _shuffled(ids: np.ndarray, batch_size: int) -> BatchPlan:
    def plan(epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(ids)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    return plan
