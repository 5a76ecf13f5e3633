"""The interactive report: one self-contained HTML file (plotly.js embedded, no server, no CDN).

Plots are plotly figures, which give hover, zoom, and class filtering by clicking the
legend for free; the only hand-written script shows a hovered sample's thumbnail beside
the data map and sorts and searches the candidate tables (a few lines each, see
docs/report.md for why).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from samplescope._paths import atomic_output
from samplescope.errors import SamplescopeError
from samplescope.reports._data import ReportData
from samplescope.reports.candidates import candidate_tables
from samplescope.reports.errors import ReportError
from samplescope.reports.summary import run_rows

__all__ = ["MissingHtmlDependencyError", "write_html"]

# Above this many samples the data map shows no thumbnails: each is a few hundred bytes.
MAX_THUMBNAILS = 5000
_LINE_STYLES = ("solid", "dash", "dot", "dashdot", "longdash")


class MissingHtmlDependencyError(ReportError):
    """plotly, which draws the HTML report, is not installed."""


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        msg = "the HTML report needs plotly: pip install 'samplescope[html]'"
        raise MissingHtmlDependencyError(msg) from None
    return go


def write_html(
    out: Path, runs: Sequence[tuple[str, ReportData]], section_ids: Sequence[str]
) -> Path:
    """Write the interactive report of `runs` (label, data) to `out`.

    The first run is the report's subject (summary, data map, candidates, classes); the
    training curves overlay every run, e.g. the seeds of one experiment.
    """
    go = _plotly()
    label, data = runs[0]
    blocks: list[str] = []
    first = [True]

    def plot(fig: Any, div_id: str) -> str:
        fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 50, "b": 50})
        text = fig.to_html(
            full_html=False,
            include_plotlyjs=first[0],
            div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        first[0] = False
        return text

    wanted = set(section_ids)
    if "summary" in wanted:
        blocks.append(_summary(data))
    if "findings" in wanted:
        blocks.append(_findings(data))
    if "curves" in wanted:
        blocks.append(_section("Training curves", plot(_curves(go, runs), "curves")))
    if "heatmaps" in wanted or "deciles" in wanted:
        blocks.append(
            _section(
                "Share of each layer's importance by difficulty decile",
                plot(_deciles(go, data), "deciles"),
            )
        )
    if data.has_outputs and "datamap" in wanted:
        blocks.append(_datamap(go, data, plot))
    if data.has_outputs and "candidates" in wanted:
        blocks.append(_candidates(data))
    body = "\n".join(blocks)
    title = html.escape(data.report_title)
    overlay = (
        f"<p class='note'>Curves overlay {len(runs)} runs: "
        + ", ".join(html.escape(name) for name, _ in runs)
        + ".</p>"
        if len(runs) > 1
        else ""
    )
    page = _TEMPLATE.format(title=title, run=html.escape(label), overlay=overlay, body=body)
    with atomic_output(out) as temp:  # never a half-written page at the target
        temp.write_text(page, encoding="utf-8")
    return out


def _section(title: str, inner: str, note: str = "") -> str:
    extra = f"<p class='note'>{note}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{extra}{inner}</section>"


def _summary(data: ReportData) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in run_rows(data)
    )
    layers = "".join(
        f"<tr><td>L{r['layer_index']}</td><td>{html.escape(str(r['layer']))}</td>"
        f"<td>{html.escape(str(r['kind']))}</td><td class='num'>{r['n_params']:,}</td></tr>"
        for r in data.layers.iter_rows(named=True)
    )
    return _section(
        "Run summary",
        f"<div class='row'><table class='kv'>{rows}</table>"
        "<table><thead><tr><th>#</th><th>module</th><th>kind</th><th>parameters</th></tr>"
        f"</thead><tbody>{layers}</tbody></table></div>",
    )


def _findings(data: ReportData) -> str:
    try:
        results, headlines = data.findings
    except SamplescopeError as exc:
        return _section("Findings", f"<p>No findings: {html.escape(str(exc))}</p>")
    items = "".join(f"<li>{html.escape(h)}</li>" for h in headlines)
    verdicts = "".join(
        f"<tr><td><b>{html.escape(r.verdict)}</b></td><td>{html.escape(r.statement)}</td></tr>"
        for r in results
    )
    return _section("Findings", f"<ul>{items}</ul><table>{verdicts}</table>")


def _curves(go: Any, runs: Sequence[tuple[str, ReportData]]) -> Any:
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("Loss per epoch", "Accuracy per epoch (%)", "Total importance per epoch"),
    )
    for number, (label, data) in enumerate(runs):
        dash = _LINE_STYLES[number % len(_LINE_STYLES)]
        train = data.train_epochs
        fig.add_trace(
            go.Scatter(
                x=train["epoch"].to_list(),
                y=train["loss"].to_list(),
                name=f"{label}: train loss",
                line={"dash": dash, "color": "#222"},
                legendgroup=label,
            ),
            row=1,
            col=1,
        )
        for split in data.evals["split"].unique(maintain_order=True).to_list():
            part = data.evals.filter(pl.col("split") == split)
            fig.add_trace(
                go.Scatter(
                    x=part["epoch"].to_list(),
                    y=part["loss"].to_list(),
                    name=f"{label}: {split} loss",
                    line={"dash": dash, "color": "#888"},
                    legendgroup=label,
                ),
                row=1,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=part["epoch"].to_list(),
                    y=(100 * part["accuracy"]).to_list(),
                    name=f"{label}: {split} accuracy",
                    line={"dash": dash, "color": "#888"},
                    legendgroup=label,
                ),
                row=1,
                col=2,
            )
        if data.has_outputs:
            fig.add_trace(
                go.Scatter(
                    x=train["epoch"].to_list(),
                    y=(100 * train["accuracy"]).to_list(),
                    name=f"{label}: train accuracy",
                    line={"dash": dash, "color": "#222"},
                    legendgroup=label,
                ),
                row=1,
                col=2,
            )
        for row in data.layers.iter_rows(named=True):
            part = data.layer_epoch.filter(pl.col("layer_index") == row["layer_index"])
            fig.add_trace(
                go.Scatter(
                    x=part["epoch"].to_list(),
                    y=part["importance"].to_list(),
                    name=f"{label}: L{row['layer_index']} {row['layer']}",
                    line={"dash": dash},
                    legendgroup=label,
                ),
                row=1,
                col=3,
            )
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_xaxes(title_text="epoch (1 = first)", dtick=1)
    fig.update_layout(height=420)
    return fig


def _deciles(go: Any, data: ReportData) -> Any:
    deciles = data.decile_epoch()
    totals = deciles.group_by("layer_index", "bin").agg(pl.col("importance").sum())
    share = np.zeros((data.layers.height, 10))
    for row in totals.iter_rows(named=True):
        share[row["layer_index"], row["bin"]] = row["importance"]
    share = 100 * share / np.maximum(share.sum(axis=1, keepdims=True), 1e-300)
    labels = [f"L{r['layer_index']} {r['layer']}" for r in data.layers.iter_rows(named=True)]
    fig = go.Figure(
        go.Heatmap(
            z=share.round(2).tolist(),
            x=list(range(10)),
            y=labels,
            colorscale="Viridis",
            colorbar={"title": "%"},
            hovertemplate="%{y}, decile %{x}: %{z:.1f}% of the layer's importance<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="difficulty decile (0 = easiest)", dtick=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=120 + 40 * len(labels))
    return fig


def _datamap(go: Any, data: ReportData, plot: Any) -> str:
    samples = data.samples.drop_nulls(["confidence", "variability"]).sort("sample_id")
    ids = samples["sample_id"].to_list()
    thumbs = _thumbnail_uris(data, ids) if len(ids) <= MAX_THUMBNAILS else {}
    fig = go.Figure()
    for target in sorted(samples["target"].drop_nulls().unique().to_list()):
        part = samples.filter(pl.col("target") == target)
        custom = [
            [
                r["sample_id"],
                data.class_name(r["target"]),
                r["importance"],
                r["aum"],
                r["forgetting_events"],
                r["correctness"],
            ]
            for r in part.iter_rows(named=True)
        ]
        fig.add_trace(
            go.Scattergl(
                x=part["variability"].to_list(),
                y=part["confidence"].to_list(),
                mode="markers",
                name=data.class_name(target),
                marker={"size": 5, "opacity": 0.75},
                customdata=custom,
                hovertemplate=(
                    "sample %{customdata[0]}<br>class %{customdata[1]}<br>"
                    "confidence %{y:.3f}, variability %{x:.3f}<br>"
                    "correctness %{customdata[5]:.2f}<br>importance %{customdata[2]:.3g}<br>"
                    "AUM %{customdata[3]:.3f}<br>forgetting events %{customdata[4]}"
                    "<extra></extra>"
                ),
            )
        )
    fig.update_xaxes(title_text="variability (std of p(label) over visits)", rangemode="tozero")
    fig.update_yaxes(title_text="confidence (mean p(label) over visits)", range=[-0.02, 1.02])
    fig.update_layout(height=560, legend={"title": {"text": "class (click to filter)"}})
    note = (
        "Each point is one training sample. Hover for its id, class and scores (and its "
        "thumbnail, right); click a class in the legend to hide it, double-click to show it "
        "alone. Top left: easy to learn; middle right: ambiguous; bottom left: hard to "
        "learn, where mislabeled samples gather."
    )
    uris = json.dumps({str(k): v for k, v in thumbs.items()})
    inner = (
        "<div class='row'><div class='grow'>"
        + plot(fig, "datamap")
        + "</div><div id='thumb' class='thumb'><p class='note'>hover a point</p></div></div>"
        + f"<script>window.SAMPLESCOPE_THUMBS = {uris};</script>"
    )
    return _section("Data map (dataset cartography)", inner, note)


def _thumbnail_uris(data: ReportData, ids: list[int]) -> dict[int, str]:
    if not data.has_thumbnails:
        return {}
    return {i: _image_uri(image) for i, image in data.thumbnails(ids).items()}


def _image_uri(image: np.ndarray) -> str:
    """A data: URI of a stored thumbnail: a PNG, or an SVG line for a 1-D input."""
    image = np.asarray(image)
    if image.ndim == 1 or min(image.shape) <= 2:
        signal = image.reshape(-1, image.shape[-1]).mean(axis=0) if image.ndim > 1 else image
        n = max(signal.size - 1, 1)
        points = " ".join(
            f"{100 * i / n:.1f},{100 - 100 * float(v) / 255:.1f}" for i, v in enumerate(signal)
        )
        svg = (
            "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 100 100' width='112' "
            f"height='112'><polyline fill='none' stroke='black' points='{points}'/></svg>"
        )
        return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, image, cmap="gray_r", format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _candidates(data: ReportData) -> str:
    mislabeled, redundant = candidate_tables(data, top=50)
    header = ("sample", "label", "pred", "score", "AUM", "confidence", "forgets", "importance %")

    def table(frame: pl.DataFrame, table_id: str) -> str:
        head = "".join(f"<th data-col='{i}'>{h}</th>" for i, h in enumerate(header))
        rows = "".join(
            "<tr>"
            f"<td class='num'>{r['sample_id']}</td>"
            f"<td>{html.escape(data.class_name(r['target']))}</td>"
            f"<td>{html.escape(data.class_name(r['pred']))}</td>"
            f"<td class='num'>{r['score']:.3f}</td><td class='num'>{r['aum']:.3f}</td>"
            f"<td class='num'>{r['confidence']:.3f}</td>"
            f"<td class='num'>{r['forgetting_events']}</td>"
            f"<td class='num'>{r['importance_pct']:.3f}</td></tr>"
            for r in frame.iter_rows(named=True)
        )
        return (
            f"<input class='search' data-table='{table_id}' placeholder='search…'>"
            f"<table id='{table_id}' class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )

    inner = (
        "<div class='row'><div class='grow'><h3>Most likely mislabeled</h3>"
        + table(mislabeled, "mislabeled")
        + "</div><div class='grow'><h3>Most redundant (learned, never forgotten)</h3>"
        + table(redundant, "redundant")
        + "</div></div>"
    )
    note = (
        "Click a column header to sort, type in the box to filter rows. Mislabeled score: "
        "mean percentile rank of low AUM, low confidence and high importance; redundant: "
        "rank of low importance among samples right at the end and never forgotten."
    )
    return _section("Candidates", inner, note)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       color: #222; }}
section {{ margin: 2em 0; }} h2 {{ border-bottom: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 1em 0.5em 0; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }}
td.num {{ text-align: right; }} table.sortable th {{ cursor: pointer; }}
.row {{ display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }}
.grow {{ flex: 1; min-width: 420px; }} .note {{ color: #555; }}
.thumb {{ width: 180px; min-height: 150px; border: 1px solid #ddd; padding: 6px; }}
.thumb img {{ width: 112px; image-rendering: pixelated; }}
input.search {{ margin: 0.3em 0; padding: 2px 6px; }}
</style></head><body>
<h1>{title}</h1><p class='note'>Trace: {run}. Interactive samplescope report; works offline.</p>
{overlay}
{body}
<script>
// Thumbnail of the hovered sample beside the data map.
(function () {{
  var map = document.getElementById("datamap");
  var box = document.getElementById("thumb");
  if (!map || !box || !map.on) return;
  map.on("plotly_hover", function (event) {{
    var d = event.points[0].customdata;
    var uri = (window.SAMPLESCOPE_THUMBS || {{}})[String(d[0])];
    box.innerHTML = "<b>sample " + d[0] + "</b><br>class " + d[1] +
      (uri ? "<br><img alt='thumbnail' src='" + uri + "'>" : "<br>(no thumbnail)");
  }});
}})();
// Sortable, searchable candidate tables.
document.querySelectorAll("table.sortable th").forEach(function (th) {{
  th.addEventListener("click", function () {{
    var body = th.closest("table").tBodies[0];
    var col = Number(th.dataset.col);
    var up = th.dataset.dir !== "up";
    th.dataset.dir = up ? "up" : "down";
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {{
      var x = a.cells[col].textContent, y = b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return up ? c : -c;
    }});
    rows.forEach(function (r) {{ body.appendChild(r); }});
  }});
}});
document.querySelectorAll("input.search").forEach(function (box) {{
  box.addEventListener("input", function () {{
    var q = box.value.toLowerCase();
    Array.from(document.getElementById(box.dataset.table).tBodies[0].rows)
      .forEach(function (r) {{
        r.style.display = r.textContent.toLowerCase().includes(q) ? "" : "none";
      }});
  }});
}});
</script></body></html>
"""
