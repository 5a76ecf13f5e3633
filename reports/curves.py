"""Section 3, training curves: loss and accuracy per epoch, importance per epoch and layer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    add_caption,
    epoch_axis,
    keep_inside,
    layer_colors,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION"]


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page("Training curves")
    grid = fig.add_gridspec(2, 2, left=0.09, right=0.86, wspace=0.25)
    _loss(fig.add_subplot(grid[0, 0]), data)
    _accuracy(fig.add_subplot(grid[0, 1]), data)
    _importance(
        fig.add_subplot(grid[1, 0]),
        data,
        "importance",
        "Total importance per epoch",
        "Σ importance per epoch",
    )
    if data.scale_varies:
        _importance(
            fig.add_subplot(grid[1, 1]),
            data,
            "grad_sq",
            "Total squared gradient norm (learning-rate free)",
            "Σ ‖g‖² per epoch",
        )
        right = (
            "the gradient signal behind it (right, free of the learning rate and batch size, "
            "which changed during this run)"
        )
    else:
        # With lr and batch size constant, importance is ‖g‖² times one number: a ‖g‖²
        # panel would repeat the left one. Each layer's share of the epoch says more.
        _layer_share(fig.add_subplot(grid[1, 1]), data)
        right = (
            "each layer's share of the epoch's importance (right; lr and batch size were "
            "constant, so ‖g‖² would only rescale the left panel)"
        )
    keep_inside(fig)
    add_caption(
        fig,
        (
            "Top: how well the model fits, per epoch — training numbers are means over the "
            "epoch's per-sample visits (recorded while the model changed), held-out numbers come "
            "from the evaluations logged after each epoch. Bottom: how much each layer moved, "
            f"summed over all samples on a log scale (left), and {right}. Importance usually "
            "falls as the training set is fitted; a layer whose share rises late is being shaped "
            "by the few samples not yet fitted."
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
    epoch_axis(ax, data.epochs)
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
    epoch_axis(ax, data.epochs)
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
    epoch_axis(ax, data.epochs)
    ax.set_ylabel(ylabel)
    if column == "grad_sq":
        _layer_legend(ax, data)


def _layer_share(ax, data: ReportData) -> None:
    frame = data.layer_epoch.with_columns(
        share=100 * pl.col("importance") / pl.col("importance").sum().over("epoch")
    )
    colors = layer_colors(data.layers.height)
    for row, color in zip(data.layers.iter_rows(named=True), colors, strict=True):
        part = frame.filter(pl.col("layer_index") == row["layer_index"])
        ax.plot(
            part["epoch"],
            part["share"],
            marker=".",
            color=color,
            label=layer_label(row["layer_index"], row["layer"], row["kind"]),
        )
    ax.set_ylim(0, 100)
    ax.set_title("Each layer's share of the epoch's importance", loc="left")
    epoch_axis(ax, data.epochs)
    ax.set_ylabel("% of the epoch's importance")
    _layer_legend(ax, data)


def _layer_legend(ax, data: ReportData) -> None:
    # Beside the axes, not over the lines.
    ax.legend(
        frameon=False,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        ncols=1 if data.layers.height <= 8 else 2,
    )


SECTION = Section("curves", "Training curves", _pages)
