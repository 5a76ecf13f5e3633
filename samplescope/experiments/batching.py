"""The paper's batch-construction experiment, plus online selection by loss and by importance.

A recorded reference run gives every training sample its final loss and total importance.
Then, for each seed, every strategy trains from the same initialisation without recording:
the seven fixed-batch strategies of `samplescope.experiments.samplers`, ordinary reshuffled
batches, online batch selection by loss rank (Loshchilov & Hutter, 2016) and the same
selection ranked by each sample's latest output-layer importance (its squared gradient norm
in the last linear layer, ``‖softmax − onehot‖² · (‖h‖² + 1)``, exact for that layer).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.experiments._common import mean_std, reference_run
from samplescope.experiments.config import RunConfig
from samplescope.experiments.samplers import OnlineBatchSampler, fixed_batches
from samplescope.experiments.train import BatchPlan, TrainHook, train_run

__all__ = ["STRATEGIES", "output_layer_grad_sq", "run_batches"]

logger = logging.getLogger(__name__)

STRATEGIES = (
    "shuffle",
    "rand",
    "nlo",
    "rnlo",
    "nlm",
    "sio",
    "rsio",
    "sim",
    "online-loss",
    "online-importance",
)
_SCORE_OF = {
    "nlo": "final_loss",
    "rnlo": "final_loss",
    "nlm": "final_loss",
    "sio": "importance",
    "rsio": "importance",
    "sim": "importance",
}


def output_layer_grad_sq(logits: Tensor, targets: Tensor, h: Tensor | None) -> Tensor:
    """Per-sample squared gradient norm of cross-entropy w.r.t. the last linear layer."""
    delta = F.softmax(logits.float(), dim=1)
    delta[torch.arange(len(targets)), targets] -= 1.0
    h_sq = 0.0 if h is None else h.reshape(len(h), -1).float().square().sum(1)
    return delta.square().sum(1) * (h_sq + 1.0)


class _OnlineFeedback(TrainHook):
    """Reports each step's losses (or output-layer importances) to an online sampler.

    The importance needs the last linear layer's input, kept by a forward hook that
    `detach` removes.
    """

    def __init__(self, sampler: OnlineBatchSampler, targets: Tensor, by_loss: bool) -> None:
        self.sampler = sampler
        self.targets = targets
        self.by_loss = by_loss
        self._h: Tensor | None = None
        self._handle: Any = None

    def attach(self, model: nn.Module) -> None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self._handle = last.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._h = args[0].detach()

    def after_step(self, ids: np.ndarray, losses: Tensor, logits: Tensor) -> None:
        if self.by_loss:
            values = losses
        else:
            values = output_layer_grad_sq(logits, self.targets[torch.as_tensor(ids)], self._h)
        self.sampler.update(ids, values.cpu().numpy())

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _batches(
    strategy: str,
    ids: np.ndarray,
    scores: pl.DataFrame,
    config: RunConfig,
    targets: Tensor,
) -> tuple[BatchPlan | None, tuple[TrainHook, ...]]:
    """(batch plan, hooks) of one strategy; plan None is `train_run`'s reshuffling."""
    if strategy == "shuffle":
        return None, ()
    if strategy.startswith("online"):
        sampler = OnlineBatchSampler(ids, config.batch_size, seed=config.seed)
        feedback = _OnlineFeedback(sampler, targets, by_loss=strategy == "online-loss")
        # Lazily: each batch is drawn after the previous step's feedback.
        return (lambda epoch, rng: iter(sampler)), (feedback,)
    column = _SCORE_OF.get(strategy)
    values = None if column is None else scores[column].fill_null(0.0).to_numpy()
    fixed = fixed_batches(strategy, ids, config.batch_size, values, seed=config.seed)
    return (lambda epoch, rng: fixed), ()


def run_batches(
    config: RunConfig, out_dir: str | Path, strategies: tuple[str, ...] = STRATEGIES
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train every strategy over ``config.seeds`` seeds; write tables and a PDF figure.

    Args:
        config: dataset, model and small settings.
        out_dir: where ``reference.h5``, ``batches.csv``, ``batches_epochs.csv`` and
            ``batches.pdf`` go.
        strategies: which of `STRATEGIES` to run.

    Returns:
        (summary, per_epoch): summary has one row per strategy with the final test accuracy
        and loss, mean and std over seeds; per_epoch has strategy, seed, epoch, accuracy, loss.
    """
    out = Path(out_dir)
    data, ids, scores = reference_run(config, out)
    rows = []
    for seed in range(config.seeds):
        run = config.with_seed(seed)
        for strategy in strategies:
            plan, hooks = _batches(strategy, ids, scores, run, data.y_train)
            history = train_run(
                run,
                None,
                data=data,
                train_indices=ids,
                batch_plan=plan,
                hooks=hooks,
                progress=False,
            )
            logger.info("%s seed %d: test accuracy %.4f", strategy, seed, history.test_accuracy[-1])
            rows += [
                {
                    "strategy": strategy,
                    "seed": seed,
                    "epoch": epoch,
                    "test_accuracy": acc,
                    "test_loss": loss,
                }
                for epoch, (acc, loss) in enumerate(
                    zip(history.test_accuracy, history.test_loss, strict=True)
                )
            ]
    per_epoch = pl.DataFrame(rows)
    summary = _summary(per_epoch, strategies, config.epochs - 1)
    summary.write_csv(out / "batches.csv")
    per_epoch.write_csv(out / "batches_epochs.csv")
    plot_batches(per_epoch, out / "batches.pdf", config.describe())
    return summary, per_epoch


def _summary(per_epoch: pl.DataFrame, strategies: tuple[str, ...], last: int) -> pl.DataFrame:
    rows = []
    final = per_epoch.filter(pl.col("epoch") == last)
    for strategy in strategies:
        part = final.filter(pl.col("strategy") == strategy)
        acc, acc_std = mean_std(part["test_accuracy"].to_list())
        loss, loss_std = mean_std(part["test_loss"].to_list())
        rows.append(
            {
                "strategy": strategy,
                "seeds": part.height,
                "test_accuracy": acc,
                "test_accuracy_std": acc_std,
                "test_loss": loss,
                "test_loss_std": loss_std,
            }
        )
    return pl.DataFrame(rows)


def plot_batches(per_epoch: pl.DataFrame, path: str | Path, title: str) -> Path:
    """Test accuracy per epoch per strategy (mean over seeds, band = ±1 std), as a PDF."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    stats = (
        per_epoch.group_by("strategy", "epoch")
        .agg(
            pl.col("test_accuracy").mean().alias("mean"),
            pl.col("test_accuracy").std(ddof=1).fill_null(0.0).alias("std"),
        )
        .sort("strategy", "epoch")
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in per_epoch["strategy"].unique(maintain_order=True).to_list():
        part = stats.filter(pl.col("strategy") == strategy)
        epochs = part["epoch"].to_numpy() + 1
        mean, std = part["mean"].to_numpy(), part["std"].to_numpy()
        ax.plot(epochs, mean, marker="o", markersize=3, label=strategy)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
