"""One page of the report: a titled landscape figure with a caption strip at the bottom.

Every section draws into pages made here, so titles, captions, fonts and the footer look the
same everywhere, and every figure is closed once it is saved.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from samplescope.reports._text import escape_math

__all__ = [
    "CMAP",
    "CMAP_DIVERGING",
    "PAGE_SIZE",
    "add_caption",
    "draw_table",
    "epoch_axis",
    "keep_inside",
    "layer_colors",
    "layer_label",
    "new_page",
    "note",
]

# Landscape A4, in inches.
PAGE_SIZE = (11.69, 8.27)
# Perceptually uniform and readable in greyscale.
CMAP = "viridis"
CMAP_DIVERGING = "cividis"
_CAPTION_WIDTH = 150
_STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 14,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
}


def new_page(title: str, *, caption_lines: int = 3) -> Figure:
    """A blank page with `title` on top and room for `caption_lines` of caption below.

    Figures are made with `Figure` directly, not `pyplot`, so no global figure list grows
    and rendering works without a display.
    """
    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=PAGE_SIZE)
    fig.set_layout_engine(None)
    fig.suptitle(
        title, x=0.04, y=0.965, ha="left", fontsize=_STYLE["figure.titlesize"], fontweight="bold"
    )
    fig.subplots_adjust(
        left=0.07,
        right=0.97,
        top=0.88,
        bottom=0.12 + 0.025 * caption_lines,
        wspace=0.3,
        hspace=0.45,
    )
    return fig


def add_caption(fig: Figure, text: str) -> None:
    """Write `text` under the figure: what to read from it, in a sentence or three."""
    wrapped = "\n".join(textwrap.wrap(" ".join(text.split()), _CAPTION_WIDTH))
    fig.text(
        0.04, 0.035, wrapped, ha="left", va="bottom", fontsize=9, color="0.15", linespacing=1.4
    )


def note(fig: Figure, text: str, y: float = 0.5) -> None:
    """A centred remark on an otherwise empty page (e.g. "no evaluations recorded")."""
    fig.text(0.5, y, text, ha="center", va="center", fontsize=12, color="0.3")


def draw_table(
    ax: Any,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    col_widths: Sequence[float] | None = None,
    fontsize: float = 8.5,
) -> None:
    """A plain table filling `ax`: bold header, light rules, right-aligned numbers."""
    ax.axis("off")
    if not rows:
        ax.text(0.5, 0.5, "(none)", ha="center", va="center", color="0.4")
        return
    table = ax.table(
        cellText=[list(r) for r in rows],
        colLabels=list(header),
        colWidths=col_widths,
        loc="upper center",
        cellLoc="right",
        colLoc="right",
        edges="horizontal",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(fontsize)
    table.scale(1, 1.25)
    for (row, _col), cell in table.get_celld().items():
        cell.set_edgecolor("0.75")
        if row == 0:
            cell.set_text_props(fontweight="bold")


def layer_label(index: int, name: str, kind: str) -> str:
    """How a layer is named in legends and titles: its position, module name and kind."""
    return f"L{index} {name} ({kind})"


def layer_colors(n: int) -> list[Any]:
    """One colour per layer from input (dark) to output (light), distinct in greyscale."""
    cmap = mpl.colormaps[CMAP]
    if n == 1:
        return [cmap(0.2)]
    return [cmap(0.05 + 0.8 * i / (n - 1)) for i in range(n)]


def epoch_axis(ax: Any, epochs: Sequence[int], *, axis: str = "x") -> None:
    """Label `axis` of `ax` with whole, 1-based epochs (never -0.5 or 2.5), spanning
    `epochs` with half an epoch of room on each side."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        low, high = min(epochs) - 0.5, max(epochs) + 0.5
        (ax.set_xlim if axis == "x" else ax.set_ylim)(low, high)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)("epoch (1 = first)")


def keep_inside(fig: Figure, margin: float = 0.01) -> None:
    """Shrink axes whose tick labels, axis labels or legends stick out of the page's left or
    right edge, so long layer names on a deep model are never clipped."""
    # Measuring draws the texts: trace strings must be escaped first (see escape_math).
    escape_math(fig)
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    width = fig.get_figwidth() * fig.dpi
    for _ in range(3):  # a moved axes may push its neighbours' labels; settle in a few passes
        moved = False
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            if box is None:
                continue
            left = margin - box.x0 / width
            right = box.x1 / width - (1 - margin)
            if left <= 0 and right <= 0:
                continue
            pos = ax.get_position()
            x0 = pos.x0 + max(left, 0)
            x1 = pos.x1 - max(right, 0)
            ax.set_position((x0, pos.y0, max(x1 - x0, 0.05), pos.height))
            moved = True
        if not moved:
            return
