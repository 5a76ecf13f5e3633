"""Section 7, the data map (dataset cartography, Swayamdipta et al. 2020): each sample's
confidence vs variability over epochs, coloured by correctness, and by importance."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import CMAP, CMAP_DIVERGING, add_caption, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION"]

# Above this many samples the map is drawn as hexagonal bins (mean colour per bin) instead
# of one dot per sample: 60,000 dots neither render fast nor read well.
MAX_SCATTER = 5000


def _pages(data: ReportData) -> Iterator[Figure]:
    samples = data.samples.drop_nulls(["confidence", "variability"])
    x = samples["variability"].to_numpy()
    y = samples["confidence"].to_numpy()
    hexagons = "Hexagons show means over the samples they hold. " if len(x) > MAX_SCATTER else ""
    fig = new_page("Data map: confidence and variability across epochs", caption_lines=4)
    grid = fig.add_gridspec(1, 2, right=0.93, wspace=0.35)
    correctness = samples["correctness"].to_numpy().astype(float)
    _map(
        fig,
        fig.add_subplot(grid[0, 0]),
        x,
        y,
        correctness,
        Normalize(0, 1),
        CMAP_DIVERGING,
        "coloured by correctness",
        "correctness (fraction of visits predicted right)",
    )
    importance = samples["importance"].to_numpy().astype(float)
    positive = importance[(importance > 0) & np.isfinite(importance)]
    norm = LogNorm(*np.percentile(positive, [1, 99])) if positive.size else None
    _map(
        fig,
        fig.add_subplot(grid[0, 1]),
        x,
        y,
        np.where(importance > 0, importance, np.nan),
        norm,
        CMAP,
        "coloured by total importance",
        "total importance (log scale)",
    )
    add_caption(
        fig,
        (
            "Each sample is placed by the mean (confidence, y) and the standard deviation "
            "(variability, x) of the probability the model gave its label, over all its visits. "
            "Top left: easy-to-learn samples (high confidence, low variability). Right and "
            "middle: ambiguous samples the model kept changing its mind about. Bottom left: "
            "hard-to-learn samples, where mislabeled ones gather (low confidence, low "
            f"variability, rarely correct). {hexagons}"
            "Right: the same map coloured by importance — importance concentrates where "
            "confidence stays low."
        ),
    )
    yield fig


def _map(
    fig: Figure,
    ax,
    x: np.ndarray,
    y: np.ndarray,
    colour: np.ndarray,
    norm,
    cmap: str,
    title: str,
    label: str,
) -> None:
    if len(x) > MAX_SCATTER:
        mappable = ax.hexbin(
            x,
            y,
            C=colour,
            reduce_C_function=np.nanmean,
            gridsize=45,
            cmap=cmap,
            norm=norm,
            mincnt=1,
            linewidths=0.1,
        )
    else:
        order = np.argsort(np.nan_to_num(colour, nan=-np.inf))
        mappable = ax.scatter(
            x[order], y[order], c=colour[order], s=7, cmap=cmap, norm=norm, linewidths=0, alpha=0.85
        )
    ax.set_xlabel("variability (std of p(label) over visits)")
    ax.set_ylabel("confidence (mean p(label) over visits)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(f"Data map {title}", loc="left")
    fig.colorbar(mappable, ax=ax, label=label, fraction=0.05, pad=0.02)


SECTION = Section("datamap", "Data map (dataset cartography)", _pages, needs_outputs=True)
