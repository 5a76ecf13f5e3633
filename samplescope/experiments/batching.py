"""The paper's batch-construction experiment, plus online selection by loss and by importance.

A recorded reference run gives every training sample its final loss and total importance.
Then, for each seed, every strategy trains from the same initialisation without recording:
the seven fixed-batch strategies of `samplescope.recorder.batching`, ordinary reshuffled
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
from torch import Tensor

from samplescope.experiments._common import (
    Setting,
    mean_std,
    plain_train,
    reference_run,
)
from samplescope.recorder.batching import OnlineBatchSampler, fixed_batches

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


def _batches(
    strategy: str,
    ids: np.ndarray,
    scores: pl.DataFrame,
    setting: Setting,
    seed: int,
    targets: Tensor,
) -> tuple[Any, Any]:
    """(batches(epoch), feedback) for one strategy."""
    if strategy == "shuffle":
        rng = np.random.default_rng(seed)

        def shuffled(epoch: int) -> list[np.ndarray]:
            order = rng.permutation(ids)
            return [
                order[i : i + setting.batch_size] for i in range(0, len(order), setting.batch_size)
            ]

        return shuffled, None
    if strategy.startswith("online"):
        sampler = OnlineBatchSampler(ids, setting.batch_size, seed=seed)
        by_loss = strategy == "online-loss"

        def feedback(batch: np.ndarray, losses: Tensor, logits: Tensor, h: Tensor | None) -> None:
            index = torch.as_tensor(batch)
            values = losses if by_loss else output_layer_grad_sq(logits, targets[index], h)
            sampler.update(batch, values.numpy())

        return (lambda epoch: iter(sampler)), feedback
    column = _SCORE_OF.get(strategy)
    values = None if column is None else scores[column].fill_null(0.0).to_numpy()
    fixed = fixed_batches(strategy, ids, setting.batch_size, values, seed=seed)
    return (lambda epoch: fixed), None


def run_batches(
    setting: Setting, out_dir: str | Path, strategies: tuple[str, ...] = STRATEGIES
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train every strategy over ``setting.seeds`` seeds; write tables and a PDF figure.

    Args:
        setting: dataset, model and small settings.
        out_dir: where ``reference.h5``, ``batches.csv``, ``batches_epochs.csv`` and
            ``batches.pdf`` go.
        strategies: which of `STRATEGIES` to run.

    Returns:
        (summary, per_epoch): summary has one row per strategy with the final test accuracy
        and loss, mean and std over seeds; per_epoch has strategy, seed, epoch, accuracy, loss.
    """
    out = Path(out_dir)
    data, ids, scores = reference_run(setting, out)
    rows = []
    for seed in range(setting.seeds):
        for strategy in strategies:
            batches, feedback = _batches(strategy, ids, scores, setting, seed, data.y_train)
            history = plain_train(setting, data, seed, batches, feedback=feedback)
            logger.info(
                "%s seed %d: test accuracy %.4f", strategy, seed, history["test_accuracy"][-1]
            )
            rows += [
                {
                    "strategy": strategy,
                    "seed": seed,
                    "epoch": epoch,
                    "test_accuracy": acc,
                    "test_loss": loss,
                }
                for epoch, (acc, loss) in enumerate(
                    zip(history["test_accuracy"], history["test_loss"], strict=True)
                )
            ]
    per_epoch = pl.DataFrame(rows)
    summary = _summary(per_epoch, strategies, setting.epochs - 1)
    summary.write_csv(out / "batches.csv")
    per_epoch.write_csv(out / "batches_epochs.csv")
    plot_batches(per_epoch, out / "batches.pdf", setting.describe())
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
