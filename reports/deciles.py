"""Section 5, where and when importance lives: per difficulty decile, each layer's share of
importance, the importance-weighted mean epoch, and the importance-weighted mean depth."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    CMAP,
    add_caption,
    keep_inside,
    layer_colors,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION"]


def _pages(data: ReportData) -> Iterator[Figure]:
    deciles = data.decile_epoch()
    fig = new_page("Where and when importance lives, by difficulty decile", caption_lines=4)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1], left=0.13, wspace=0.55)
    _share(fig, fig.add_subplot(grid[0, :]), data, deciles)
    _mean_epoch(fig.add_subplot(grid[1, 0]), data, deciles)
    _mean_depth(fig.add_subplot(grid[1, 1]), data, deciles)
    keep_inside(fig)
    add_caption(
        fig,
        (
            "Top: each row is a layer (L0 nearest the input); a cell is the percentage of that "
            "layer's total importance carried by one difficulty decile (0 = easiest 10% of "
            "samples by final loss). Rows sum to 100%; an even spread reads 10%. Bottom left: "
            "when each decile mattered — the epoch averaged with importance as weight. A rising "
            "line means hard samples matter later in training. Bottom right: where each decile "
            "mattered — the layer position averaged with importance as weight, from 0 (input) to "
            "1 (output)."
        ),
    )
    yield fig


def _share(fig: Figure, ax, data: ReportData, deciles: pl.DataFrame) -> None:
    totals = deciles.group_by("layer_index", "bin").agg(pl.col("importance").sum())
    n_layers = data.layers.height
    share = np.zeros((n_layers, 10))
    for row in totals.iter_rows(named=True):
        share[row["layer_index"], row["bin"]] = row["importance"]
    share = 100 * share / np.maximum(share.sum(axis=1, keepdims=True), 1e-300)
    image = ax.imshow(share, aspect="auto", cmap=CMAP, vmin=0, origin="upper")
    for (i, j), value in np.ndenumerate(share):
        bright = image.norm(value) > 0.6
        ax.text(
            j,
            i,
            f"{value:.0f}",
            ha="center",
            va="center",
            fontsize=7 if n_layers > 6 else 8,
            color="black" if bright else "white",
        )
    labels = [
        layer_label(r["layer_index"], r["layer"], r["kind"])
        for r in data.layers.iter_rows(named=True)
    ]
    ax.set_yticks(range(n_layers), labels)
    ax.set_xticks(range(10))
    ax.set_xlabel("difficulty decile (0 = easiest)")
    ax.set_title("Share of each layer's importance by difficulty decile (%)", loc="left")
    fig.colorbar(image, ax=ax, label="% of the layer's importance", fraction=0.03, pad=0.01)


def _mean_epoch(ax, data: ReportData, deciles: pl.DataFrame) -> None:
    when = (
        deciles.group_by("layer_index", "bin")
        .agg(
            ((pl.col("importance") * pl.col("epoch")).sum() / pl.col("importance").sum()).alias(
                "epoch"
            )
        )
        .sort("layer_index", "bin")
    )
    _lines(ax, data, when, "epoch")
    # The whole run's span, so a small shift does not look dramatic.
    if len(data.epochs) > 1:
        ax.set_ylim(min(data.epochs), max(data.epochs))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("importance-weighted mean epoch\n(1 = first)")
    ax.set_title("When each decile mattered", loc="left")


def _mean_depth(ax, data: ReportData, deciles: pl.DataFrame) -> None:
    span = max(data.layers.height - 1, 1)
    where = (
        deciles.group_by("bin")
        .agg(
            (
                (pl.col("importance") * pl.col("layer_index")).sum()
                / pl.col("importance").sum()
                / span
            ).alias("depth")
        )
        .sort("bin")
    )
    ax.plot(where["bin"], where["depth"], marker="o", color="0.15")
    ax.set_xticks(range(10))
    ax.set_xlabel("difficulty decile (0 = easiest)")
    ax.set_ylabel("importance-weighted layer position\n(0 = input, 1 = output)")
    ax.set_title("Where each decile mattered", loc="left")
    # The full 0–1 range: a zoomed axis made a 0.04 difference look dramatic.
    ax.set_ylim(0, 1)


def _lines(ax, data: ReportData, frame: pl.DataFrame, column: str) -> None:
    for row, color in zip(
        data.layers.iter_rows(named=True), layer_colors(data.layers.height), strict=True
    ):
        part = frame.filter(pl.col("layer_index") == row["layer_index"])
        ax.plot(
            part["bin"],
            part[column],
            marker="o",
            markersize=3,
            color=color,
            label=layer_label(row["layer_index"], row["layer"], row["kind"]),
        )
    ax.set_xticks(range(10))
    ax.set_xlabel("difficulty decile (0 = easiest)")
    ax.legend(
        frameon=False,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        ncols=1 if data.layers.height <= 8 else 2,
    )


SECTION = Section("deciles", "Where and when importance lives", _pages)
