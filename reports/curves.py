"""Section 2, training curves: loss and accuracy per epoch, importance per epoch and layer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, layer_colors, layer_label, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION"]


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page("Training curves")
    grid = fig.add_gridspec(2, 2, left=0.09, wspace=0.25)
    _loss(fig.add_subplot(grid[0, 0]), data)
    _accuracy(fig.add_subplot(grid[0, 1]), data)
    _importance(
        fig.add_subplot(grid[1, 0]),
        data,
        "importance",
        "Total importance per epoch",
        "Σ importance per epoch",
    )
    _importance(
        fig.add_subplot(grid[1, 1]),
        data,
        "grad_sq",
        "Total squared gradient norm (learning-rate free)",
        "Σ ‖g‖² per epoch",
    )
    add_caption(
        fig,
        (
            "Top: how well the model fits, per epoch — training numbers are means over the "
            "epoch's per-sample visits (recorded while the model changed), held-out numbers come "
            "from the evaluations logged after each epoch. Bottom: how much each layer moved "
            "(left) and the gradient signal behind it (right), summed over all samples, on a log "
            "scale. Both usually fall as the training set is fitted; a layer whose share rises "
            "late is being shaped by the few samples not yet fitted."
        ),
    )
    yield fig


def _split_styles(data: ReportData) -> list[tuple[str, str]]:
    splits = data.evals["split"].unique(maintain_order=True).to_list()
    return [(split, ("--", ":", "-.")[i % 3]) for i, split in enumerate(splits)]


def _loss(ax, data: ReportData) -> None:
    train = data.train_epochs
    ax.plot(
        train["epoch"], train["loss"], marker=".", label="train (mean over visits)", color="0.1"
    )
    for split, style in _split_styles(data):
        part = data.evals.filter(pl.col("split") == split)
        ax.plot(part["epoch"], part["loss"], style, marker=".", label=split, color="0.45")
    ax.set_title("Loss per epoch", loc="left")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss (nats)")
    if train["loss"].min() > 0:
        ax.set_yscale("log")
    ax.legend(frameon=False)


def _accuracy(ax, data: ReportData) -> None:
    train = data.train_epochs
    plotted = False
    if data.has_outputs:
        ax.plot(
            train["epoch"],
            100 * train["accuracy"],
            marker=".",
            color="0.1",
            label="train (during the epoch)",
        )
        plotted = True
    for split, style in _split_styles(data):
        part = data.evals.filter(pl.col("split") == split)
        if part["accuracy"].is_nan().all():
            continue
        ax.plot(part["epoch"], 100 * part["accuracy"], style, marker=".", color="0.45", label=split)
        plotted = True
    ax.set_title("Accuracy per epoch", loc="left")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    if plotted:
        ax.legend(frameon=False, loc="lower right")
    else:
        ax.text(
            0.5,
            0.5,
            "no accuracy recorded\n(no logits/targets, no evaluations)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )


def _importance(ax, data: ReportData, column: str, title: str, ylabel: str) -> None:
    colors = layer_colors(data.layers.height)
    for row, color in zip(data.layers.iter_rows(named=True), colors, strict=True):
        part = data.layer_epoch.filter(pl.col("layer_index") == row["layer_index"])
        values = part[column].to_numpy()
        ax.plot(
            part["epoch"],
            np.where(values > 0, values, np.nan),
            marker=".",
            color=color,
            label=layer_label(row["layer_index"], row["layer"], row["kind"]),
        )
    ax.set_yscale("log")
    ax.set_title(title, loc="left")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, ncols=2 if data.layers.height > 4 else 1, loc="best", fontsize=7)


SECTION = Section("curves", "Training curves", _pages)
