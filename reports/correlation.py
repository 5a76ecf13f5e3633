"""Section 6, the paper's central relation: Spearman correlation of importance with final
loss, per epoch and layer; and how concentrated importance is."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    add_caption,
    epoch_axis,
    layer_colors,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION"]


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page("Does importance track difficulty? Correlation with final loss", caption_lines=5)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 1])
    _correlation(fig.add_subplot(grid[0, 0]), data)
    _concentration(fig.add_subplot(grid[0, 1]), data)
    add_caption(
        fig,
        (
            "Left: for each epoch and layer, the Spearman rank correlation across samples between "
            "the importance a sample had in that epoch and its final training loss. The last epoch "
            "is shaded and drawn hollow: its importance and the final loss come from the same "
            "visit, so its ρ near 1 is circular, not evidence. Near +1: the "
            "samples that move the layer are the ones that end up hard; near 0: importance says "
            "nothing about final difficulty; negative: easy samples dominate. The paper reports "
            "a correlation that grows over training. Right: how concentrated each layer's "
            "importance is — the share carried by the 10% most important samples, the next 10%, "
            "and the remaining 80% (the paper's grouping). Even spread would be 10/10/80."
        ),
    )
    yield fig


def _correlation(ax, data: ReportData) -> None:
    corr = data.correlations
    last = max(data.epochs) if data.epochs else None
    for row, color in zip(
        data.layers.iter_rows(named=True), layer_colors(data.layers.height), strict=True
    ):
        part = corr.filter(pl.col("layer_index") == row["layer_index"])
        earlier = part.filter(pl.col("epoch") != last) if len(data.epochs) > 1 else part
        ax.plot(
            earlier["epoch"],
            earlier["spearman"],
            marker=".",
            color=color,
            label=layer_label(row["layer_index"], row["layer"], row["kind"]),
        )
        if len(data.epochs) > 1:
            # The final loss is measured at each sample's last visit, the same pass that
            # gives its last-epoch gradient: that correlation is near 1 by construction.
            final = part.filter(pl.col("epoch") == last)
            ax.plot(
                final["epoch"],
                final["spearman"],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                color=color,
            )
    if len(data.epochs) > 1:
        ax.axvspan(last - 0.5, last + 0.5, color="0.93", zorder=0)
        ax.text(
            last,
            -1.0,
            "last epoch:\ncircular\n(same pass as\nthe final loss)",
            ha="center",
            va="bottom",
            fontsize=7,
            color="0.35",
        )
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    epoch_axis(ax, data.epochs)
    ax.set_ylabel("Spearman ρ (importance in epoch vs final loss)")
    ax.set_title("Rank correlation of importance with final loss", loc="left")
    ax.legend(frameon=False, loc="upper left", ncols=2 if data.layers.height > 4 else 1)


def _concentration(ax, data: ReportData) -> None:
    groups = data.importance_groups
    labels = ["top 10%", "next 10%", "rest 80%"]
    shades = ["0.15", "0.5", "0.82"]
    y = np.arange(data.layers.height)
    left = np.zeros(len(y))
    for group, label, shade in zip(range(3), labels, shades, strict=True):
        part = groups.filter(pl.col("group") == group).sort("layer_index")
        values = np.zeros(len(y))
        values[part["layer_index"].to_numpy()] = 100 * part["share"].to_numpy()
        ax.barh(y, values, left=left, color=shade, label=label, edgecolor="white")
        for yi, (x0, width) in enumerate(zip(left, values, strict=True)):
            if width >= 6:
                ax.text(
                    x0 + width / 2,
                    yi,
                    f"{width:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shade != "0.82" else "black",
                )
        left += values
    ax.set_yticks(y, [f"L{i}" for i in y])
    ax.set_ylabel("layer (L0 nearest the input)")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the layer's importance")
    ax.set_title("Concentration of importance", loc="left", pad=22)
    ax.legend(
        frameon=False,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncols=3,
        borderaxespad=0.2,
        handlelength=1.2,
    )


SECTION = Section("correlation", "Correlation of importance with final loss", _pages)
