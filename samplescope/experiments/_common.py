"""Settings and helpers shared by the experiments: data, subsets, configs, one plain loop."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.errors import SamplescopeError
from samplescope.experiments.data import Dataset, load_dataset
from samplescope.experiments.models import make_model
from samplescope.experiments.train import PRESETS, RunConfig, evaluate, train_run

__all__ = ["ExperimentError", "Setting", "plain_train", "reference_run", "reference_scores"]

logger = logging.getLogger(__name__)


class ExperimentError(SamplescopeError):
    """Bad experiment settings (e.g. a subset larger than the training set)."""


@dataclass
class Setting:
    """The small settings every experiment command takes."""

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-5
    hidden: int = 512
    depth: int = 3
    subset: int | None = None
    data_dir: str | None = None
    seeds: int = 1
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                msg = f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}"
                raise ExperimentError(msg)
            for key, value in PRESETS[self.preset].items():
                if key in {f.name for f in dataclasses.fields(self)} and key != "epochs":
                    setattr(self, key, value)
        if self.epochs < 1 or self.seeds < 1:
            msg = "epochs and seeds must be at least 1"
            raise ExperimentError(msg)

    def load(self) -> Dataset:
        """The dataset (split with seed 0: every seed sees the same data)."""
        return load_dataset(self.dataset, self.data_dir, seed=0)

    def train_ids(self, data: Dataset) -> np.ndarray:
        """All training indices, or a fixed random subset of ``subset`` of them."""
        n = len(data.x_train)
        if self.subset is None:
            return np.arange(n)
        if not 1 <= self.subset <= n:
            msg = f"--subset must be between 1 and {n} (the training set's size), not {self.subset}"
            raise ExperimentError(msg)
        return np.sort(np.random.default_rng(0).permutation(n)[: self.subset])

    def config(self, seed: int) -> RunConfig:
        return RunConfig(
            dataset=self.dataset,
            model=self.model,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            hidden=self.hidden,
            depth=self.depth,
            seed=seed,
            preset=self.preset,
        )

    def describe(self) -> str:
        subset = "all" if self.subset is None else str(self.subset)
        return (
            f"{self.dataset}, {self.model} (hidden {self.hidden} x {self.depth}), "
            f"{self.epochs} epochs, batch {self.batch_size}, SGD lr {self.lr}, "
            f"weight decay {self.weight_decay}, training samples: {subset}, "
            f"seeds: {self.seeds}"
        )


def initial_state(setting: Setting, data: Dataset, seed: int) -> dict[str, Tensor]:
    """The initialisation of seed ``seed``, shared by every strategy or subset of that seed."""
    torch.manual_seed(seed)
    model = make_model(
        setting.model, data.input_shape, data.n_classes, setting.hidden, setting.depth
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


# batches(epoch) -> iterable of index arrays; after each step, feedback(ids, losses, logits, h).
Feedback = Callable[[np.ndarray, Tensor, Tensor, Tensor | None], None]


def plain_train(
    setting: Setting,
    data: Dataset,
    seed: int,
    batches: Callable[[int], Iterable[Any]],
    targets: Tensor | None = None,
    feedback: Feedback | None = None,
) -> dict[str, list[float]]:
    """Train without recording; return test accuracy and loss after every epoch.

    ``feedback`` also gets the input of the last linear layer (for output-layer gradient
    norms), captured by a forward hook that is removed on exit.
    """
    model = make_model(
        setting.model, data.input_shape, data.n_classes, setting.hidden, setting.depth
    )
    model.load_state_dict(initial_state(setting, data, seed))
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=setting.lr, weight_decay=setting.weight_decay
    )
    y_all = data.y_train if targets is None else targets
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: dict[str, Tensor] = {}
    handle = last.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach()))
    history: dict[str, list[float]] = {"test_accuracy": [], "test_loss": []}
    try:
        for epoch in range(setting.epochs):
            model.train()
            for batch in batches(epoch):
                index = torch.as_tensor(np.asarray(batch), dtype=torch.int64)
                logits = model(data.x_train[index])
                losses = F.cross_entropy(logits, y_all[index], reduction="none")
                losses.mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if feedback is not None:
                    feedback(index.numpy(), losses.detach(), logits.detach(), seen.get("h"))
            loss, accuracy = evaluate(model, data.x_test, data.y_test)
            history["test_accuracy"].append(accuracy)
            history["test_loss"].append(loss)
    finally:
        handle.remove()
    return history


def reference_run(
    setting: Setting, out_dir: Path, recorder_options: dict[str, Any] | None = None
) -> tuple[Dataset, np.ndarray, pl.DataFrame]:
    """Train and record the seed-0 reference run that scores every training sample.

    Returns the dataset, the training ids and `reference_scores` of the run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = setting.load()
    ids = setting.train_ids(data)
    reference = out_dir / "reference.h5"
    train_run(
        setting.config(seed=0),
        reference,
        data=data,
        train_indices=ids,
        thumbnails=False,
        overwrite=True,
        progress=False,
        recorder_options=recorder_options,
    )
    return data, ids, reference_scores(reference, ids)


def reference_scores(trace_path: str | Path, ids: np.ndarray) -> pl.DataFrame:
    """Every score of `samplescope.analysis.flags.score_table`, one row per id in ``ids``."""
    from samplescope.analysis import open_trace
    from samplescope.analysis.flags import score_table

    with open_trace(trace_path) as trace:
        table = score_table(trace)
    order = pl.DataFrame({"sample_id": ids.astype(np.int64)})
    return order.join(table, on="sample_id", how="left")


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
