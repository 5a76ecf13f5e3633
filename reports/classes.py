"""Section 10, per-class breakdown: how importance and difficulty split across classes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import CMAP, add_caption, keep_inside, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION"]

# With more classes than this, numbers are not written into the heatmap's cells.
MAX_ANNOTATED = 20


def _pages(data: ReportData) -> Iterator[Figure]:
    samples = data.samples.drop_nulls("target")
    n = max(data.n_samples - 1, 1)
    per_class = (
        samples.group_by("target")
        .agg(
            n=pl.len(),
            importance=pl.col("importance").sum(),
            accuracy=pl.col("final_correct").cast(pl.Float64).mean(),
            hard=(pl.col("difficulty_decile") == 9).cast(pl.Float64).mean(),
        )
        .sort("target")
    )
    classes = per_class["target"].to_list()
    fig = new_page("Per-class breakdown of importance and difficulty", caption_lines=4)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1], right=0.93)
    labels = [data.class_name(c) for c in classes]
    _shares(fig.add_subplot(grid[0, 0]), per_class, labels)
    _difficulty(fig.add_subplot(grid[0, 1]), samples, classes, n, labels)
    _layer_heatmap(fig, fig.add_subplot(grid[1, :]), data, classes, labels)
    keep_inside(fig)
    add_caption(
        fig,
        (
            "Top left: each class's share of the training samples (light) and of all importance "
            "(dark); a class whose dark bar is much taller is harder or noisier than its size "
            "suggests. Top right: each class's difficulty — the distribution of its samples' "
            "rank by final loss (box: quartiles, whiskers: 5–95%; 0 = easiest), with the share "
            "of its samples still wrong at the end written above. Bottom: per layer, the "
            "percentage of the layer's importance carried by each class (each row sums to 100%)."
        ),
    )
    yield fig


def _class_ticks(ax, labels: list[str]) -> None:
    """Class names under the bars; slanted when they are words, small when there are many."""
    long = max((len(label) for label in labels), default=0) > 3
    ax.set_xticks(
        np.arange(len(labels)),
        labels,
        fontsize=8 if len(labels) <= 20 else 6,
        rotation=30 if long else 0,
        ha="right" if long else "center",
    )


def _shares(ax, per_class: pl.DataFrame, labels: list[str]) -> None:
    x = np.arange(per_class.height)
    sample_share = 100 * per_class["n"].to_numpy() / max(per_class["n"].sum(), 1)
    imp_share = (
        100 * per_class["importance"].to_numpy() / max(per_class["importance"].sum(), 1e-300)
    )
    ax.bar(x - 0.2, sample_share, width=0.4, color="0.75", label="share of samples")
    ax.bar(x + 0.2, imp_share, width=0.4, color="0.2", label="share of importance")
    _class_ticks(ax, labels)
    ax.set_xlabel("class (label)")
    ax.set_ylabel("% of all samples / importance")
    ax.set_title("Importance vs size, per class", loc="left", pad=18)
    # Above the axes, where it cannot cover a bar.
    ax.legend(
        frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, borderaxespad=0.1
    )


def _difficulty(ax, samples: pl.DataFrame, classes: list[int], n: int, labels: list[str]) -> None:
    groups = [
        100 * samples.filter(pl.col("target") == c)["difficulty_rank"].to_numpy() / n
        for c in classes
    ]
    ax.boxplot(
        groups,
        positions=np.arange(len(classes)),
        widths=0.6,
        whis=(5, 95),
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "0.85", "edgecolor": "0.2"},
        medianprops={"color": "black"},
    )
    wrong = [
        100 * (1 - samples.filter(pl.col("target") == c)["final_correct"].cast(pl.Float64).mean())
        for c in classes
    ]
    for i, w in enumerate(wrong):
        ax.text(i, 103, f"{w:.0f}%", ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_ylim(0, 112)
    _class_ticks(ax, labels)
    ax.set_xlabel("class (label); above: % wrong at the end")
    ax.set_ylabel("difficulty rank percentile\n(0 = easiest)")
    ax.set_title("Difficulty per class", loc="left")


def _layer_heatmap(
    fig: Figure, ax, data: ReportData, classes: list[int], labels: list[str]
) -> None:
    table = data.class_layer.drop_nulls("target")
    index = {c: i for i, c in enumerate(classes)}
    n_layers = data.layers.height
    grid = np.zeros((n_layers, len(classes)))
    for r in table.iter_rows(named=True):
        if r["target"] in index:
            grid[r["layer_index"], index[r["target"]]] = r["importance"]
    grid = 100 * grid / np.maximum(grid.sum(axis=1, keepdims=True), 1e-300)
    image = ax.imshow(grid, aspect="auto", cmap=CMAP, vmin=0)
    if len(classes) <= MAX_ANNOTATED:
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if image.norm(value) > 0.6 else "white",
            )
    _class_ticks(ax, labels)
    ax.set_yticks(np.arange(n_layers), [f"L{i} {name}" for i, name in enumerate(data.layer_names)])
    ax.set_xlabel("class (label)")
    ax.set_title("Share of each layer's importance by class (%)", loc="left")
    fig.colorbar(image, ax=ax, label="% of the layer's importance", fraction=0.03, pad=0.01)


SECTION = Section("classes", "Per-class breakdown", _pages, needs_outputs=True)
