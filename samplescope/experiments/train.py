"""One recorded training run on a named dataset: the engine behind train, demo and experiments."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from samplescope.errors import SamplescopeError
from samplescope.experiments.data import Dataset, load_dataset
from samplescope.experiments.models import make_model
from samplescope.recorder import Recorder

__all__ = ["PRESETS", "RunConfig", "RunResult", "evaluate", "train_run"]

logger = logging.getLogger(__name__)

# Batches for one epoch: a list of index arrays into the training set.
BatchPlan = Callable[[int, np.random.Generator], Sequence[np.ndarray]]


@dataclass
class RunConfig:
    """Everything that defines a run; stored in the trace's ``config``."""

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    hidden: int = 512
    depth: int = 3
    seed: int = 0
    reduction: str = "mean"
    preset: str | None = None


# The paper's protocol (Gao & Jojic): MLP 3×512 ReLU, Glorot init, cross-entropy over
# batches of 100, plain SGD at 0.1, weight decay 1e-5, no momentum, 50 epochs. The batch
# mean is used: the summed loss at this learning rate diverges.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "model": "mlp",
        "hidden": 512,
        "depth": 3,
        "batch_size": 100,
        "lr": 0.1,
        "weight_decay": 1e-5,
        "momentum": 0.0,
        "epochs": 50,
        "reduction": "mean",
    }
}


@dataclass
class RunResult:
    path: Path | None
    config: RunConfig
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


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
) -> RunResult:
    """Train ``config`` with plain SGD, recording every sample at every step to ``out``.

    Args:
        config: the run's settings.
        out: the trace to write; None trains without recording (for baselines and timing).
        data: an already loaded dataset (else ``load_dataset(config.dataset, data_dir)``).
        train_indices: train on this subset of the training set (sample ids stay the
            original indices).
        train_targets: labels to train on instead of the dataset's (e.g. with noise).
        batch_plan: ``(epoch, rng) -> list of index arrays``; default: shuffled batches.
        init_state: a model state_dict to start from (same initialisation across runs).
        sample_info, thumbnails, recorder_options: passed to the Recorder.
        progress: show a progress bar over the run's batches (epoch, test accuracy).
        device: where the model and data live, e.g. ``"cuda"``; the trace is the same.
    """
    data = data or load_dataset(config.dataset, data_dir, seed=config.seed)
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
            **(recorder_options or {}),
        )
    start = time.perf_counter()
    with recorder if recorder is not None else contextlib.nullcontext():
        bar = _progress_bar(config, None if batch_plan else len(ids), progress)
        for epoch in range(config.epochs):
            model.train()
            if recorder is not None:
                recorder.set_epoch(epoch)
            correct = seen = 0
            for batch in plan(epoch, rng):
                index = torch.as_tensor(batch, dtype=torch.int64)
                xb, yb = x[index.to(device)], y[index.to(device)]
                logits = model(xb)
                losses = F.cross_entropy(logits, yb, reduction="none")
                if recorder is not None:
                    recorder.backward(losses, sample_ids=index, logits=logits, targets=yb)
                else:
                    (losses.mean() if config.reduction == "mean" else losses.sum()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
                bar.update(1)
            test_loss, test_acc = evaluate(model, x_test, y_test)
            result.train_accuracy.append(correct / max(seen, 1))
            result.test_loss.append(test_loss)
            result.test_accuracy.append(test_acc)
            if recorder is not None:
                recorder.log_eval("test", loss=test_loss, accuracy=test_acc)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{config.epochs}",
                test_acc=f"{test_acc:.3f}",
                train_acc=f"{correct / max(seen, 1):.3f}",
            )
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


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
    stored: dict[str, Any] = dict(vars(config))
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


def _shuffled(ids: np.ndarray, batch_size: int) -> BatchPlan:
    def plan(epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(ids)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    return plan
