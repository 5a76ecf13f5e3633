"""The one settings object of every training run and experiment, and what it can be set to.

`RunConfig` is what `samplescope train`, the demo and every experiment train with. Presets
are constructors (`RunConfig.paper`, `RunConfig.from_preset`): they fill every field they
name, momentum and reduction included, and what the caller passes wins over them.

The registries of names (`DATASETS`, `MODELS`, `PRESETS`) live here, torch-free, so the
CLI builds its choices and help from them without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from samplescope.errors import SamplescopeError

if TYPE_CHECKING:
    from samplescope.experiments.data import Dataset

__all__ = ["DATASETS", "MODELS", "PRESETS", "REDUCTIONS", "ExperimentError", "RunConfig"]


class ExperimentError(SamplescopeError):
    """Bad experiment settings (e.g. a subset larger than the training set)."""


# The named datasets (`samplescope.experiments.data.load_dataset`) and models
# (`samplescope.experiments.models.make_model`).
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "mnist1d")
MODELS = ("mlp", "cnn")
REDUCTIONS = ("mean", "sum")

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

# Fields that say where things are or how many runs an experiment makes, not what one run
# is: they stay out of the config a trace stores.
_NOT_STORED = ("subset", "seeds", "data_dir")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (stored in its trace's ``config``), plus the experiments'
    ``subset``, ``seeds`` and ``data_dir``.

    Attributes:
        dataset, model: a name of `samplescope.experiments.data.DATASETS` and of
            `samplescope.experiments.models.MODELS`.
        epochs, batch_size, lr, momentum, weight_decay: plain SGD's settings.
        hidden, depth: the MLP's hidden width and number of hidden layers.
        seed: the run's seed (initialisation and batch order).
        reduction: how the batch loss combines per-sample losses, ``mean`` or ``sum``.
        preset: the preset the config was built from (`from_preset`), or None.
        subset: train on a fixed random subset of this many training samples (None: all).
        seeds: how many seeds an experiment runs (0, 1, ...).
        data_dir: where the dataset's files are (None: the dataset's default).

    Raises:
        ExperimentError: a value out of range, or an unknown preset or reduction.
    """

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 1e-5
    hidden: int = 512
    depth: int = 3
    seed: int = 0
    reduction: str = "mean"
    preset: str | None = None
    subset: int | None = None
    seeds: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            msg = f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}"
            raise ExperimentError(msg)
        for name, value, known in (
            ("dataset", self.dataset, DATASETS),
            ("model", self.model, MODELS),
            ("reduction", self.reduction, REDUCTIONS),
        ):
            if value not in known:
                msg = f"unknown {name} {value!r}; choose one of {', '.join(known)}"
                raise ExperimentError(msg)
        if self.epochs < 1 or self.seeds < 1 or self.batch_size < 1:
            msg = "epochs, seeds and batch_size must be at least 1"
            raise ExperimentError(msg)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RunConfig:
        """The preset ``name``'s settings, with ``overrides`` winning over them."""
        if name not in PRESETS:
            msg = f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
            raise ExperimentError(msg)
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @classmethod
    def paper(cls, **overrides: Any) -> RunConfig:
        """The paper's protocol (`PRESETS["paper"]`), with ``overrides`` winning over it."""
        return cls.from_preset("paper", **overrides)

    def with_seed(self, seed: int) -> RunConfig:
        """The same config with another seed (one run of a multi-seed experiment)."""
        return dataclasses.replace(self, seed=seed)

    def stored(self) -> dict[str, Any]:
        """The fields a trace stores as its ``config``: what defines the run."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_STORED}

    def load(self) -> Dataset:
        """The dataset (split with seed 0: every seed of an experiment sees the same data)."""
        from samplescope.experiments.data import load_dataset

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

    def describe(self) -> str:
        """One line for tables and figure captions."""
        subset = "all" if self.subset is None else str(self.subset)
        return (
            f"{self.dataset}, {self.model} (hidden {self.hidden} x {self.depth}), "
            f"{self.epochs} epochs, batch {self.batch_size}, SGD lr {self.lr}, "
            f"momentum {self.momentum}, weight decay {self.weight_decay}, "
            f"training samples: {subset}, seeds: {self.seeds}"
        )
