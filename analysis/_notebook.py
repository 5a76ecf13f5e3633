"""Jupyter's view of a trace: its key facts and a layer × epoch heatmap of importance
shares, as plain HTML (no plotting library)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from samplescope.analysis.trace import Trace

__all__ = ["notebook_html"]


# Facts the notebook view shows first, when the trace has them.
_NOTEBOOK_KEYS = (
    "model",
    "optimizer",
    "reduction",
    "n_samples",
    "n_epochs",
    "n_steps",
    "n_visits",
    "has_outputs",
    "created",
)


def notebook_html(trace: Trace) -> str:
    """The notebook view of `trace` (`Trace._repr_html_`)."""
    import html

    meta = trace.meta
    facts = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(str(meta[k]))}</td></tr>"
        for k in _NOTEBOOK_KEYS
        if k in meta
    )
    paths = ", ".join(html.escape(str(p)) for p in meta.get("paths", []))
    share = trace.sql(
        "SELECT layer_index, epoch, sum(importance) AS imp FROM importance GROUP BY ALL"
    ).pl()
    share = share.with_columns(
        (pl.col("imp") / pl.col("imp").sum().over("epoch")).fill_nan(0.0).alias("share")
    )
    epochs = sorted(share["epoch"].unique().to_list())
    cell = {(r["layer_index"], r["epoch"]): r["share"] for r in share.iter_rows(named=True)}
    names = trace.layers()["layer"].to_list()
    head = "".join(f"<th>{e + 1}</th>" for e in epochs)
    rows = ""
    for index, name in enumerate(names):
        cells = ""
        for epoch in epochs:
            value = float(cell.get((index, epoch), 0.0) or 0.0)
            # Darker = larger share; white text on the dark half.
            level = round(255 * (1 - value))
            colour = "white" if value > 0.5 else "black"
            cells += (
                f"<td title='{100 * value:.1f}%' style='background:rgb({level},{level},255);"
                f"color:{colour};width:2em;text-align:center'>{100 * value:.0f}</td>"
            )
        rows += (
            f"<tr><th style='text-align:left'>L{index} {html.escape(str(name))}</th>{cells}</tr>"
        )
    return (
        f"<div><b>samplescope trace</b> {paths}"
        f"<table>{facts}</table>"
        "<p style='margin:0.5em 0 0.2em'>Each layer's share of the epoch's importance (%), "
        "epochs from 1:</p>"
        f"<table><tr><th></th>{head}</tr>{rows}</table></div>"
    )
