"""Section 1, the run summary: model, optimizer, data, final numbers, what the report holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, draw_table, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION", "run_rows"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _hparams(meta: dict[str, Any]) -> str:
    raw = meta.get("optimizer_hparams") or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "{}")
        except json.JSONDecodeError:
            return raw[:50] or "–"  # not JSON (a foreign or damaged trace): shown as text
    if not isinstance(raw, dict):
        return str(raw)[:50] or "–"
    keep = ("lr", "momentum", "weight_decay", "betas", "eps")
    parts = [f"{k}={_fmt(raw[k])}" for k in keep if k in raw]
    if raw.get("nesterov"):
        parts.append("nesterov")
    return ", ".join(parts) or "–"


# Config keys already shown in other rows of the summary.
_SHOWN = {"lr", "momentum", "weight_decay", "reduction", "epochs"}


def _config(meta: dict[str, Any], width: int = 50) -> str | None:
    """The user's run config (e.g. dataset, model, batch size) in one line, if recorded."""
    raw = meta.get("config") or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "{}")
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, dict) or not raw:
        return None
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in raw.items() if v is not None and k not in _SHOWN)
    return text if len(text) <= width else text[: width - 1] + "…"


def _last(frame: pl.DataFrame, column: str) -> float | None:
    values = frame[column].drop_nulls().drop_nans() if frame.height else None
    return None if values is None or values.len() == 0 else float(values[-1])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def run_rows(data: ReportData) -> list[tuple[str, str]]:
    meta = data.meta
    train = data.train_epochs
    test = data.evals.filter(pl.col("split") == "test")
    if test.height == 0 and data.evals.height:
        test = data.evals.filter(pl.col("split") == data.evals["split"][0])
    split = test["split"][0] if test.height else "test"
    size = data.trace_bytes
    paths = meta.get("paths") or ([str(data.path)] if data.path else [])
    rows = [
        (
            "trace",
            _short(paths[0]) + (f" (+{len(paths) - 1} shards)" if len(paths) > 1 else "")
            if paths
            else "–",
        ),
        ("model", str(meta.get("model", "–"))),
        ("optimizer", f"{meta.get('optimizer') or '–'} ({_hparams(meta)})"),
        ("loss reduction", str(meta.get("reduction", "–"))),
        ("training samples", f"{data.n_samples:,}"),
        ("epochs / steps", f"{len(data.epochs)} / {meta.get('n_steps', '–'):,}"),
        ("final train loss", _fmt(_last(train, "loss"))),
        ("final train accuracy", _pct(_last(train, "accuracy")) if data.has_outputs else "–"),
        (f"final {split} loss", _fmt(_last(test, "loss"))),
        (f"final {split} accuracy", _pct(_last(test, "accuracy"))),
        ("trace size", _fmt_bytes(size) if size is not None else "–"),
        ("recorded", _recorded(data)),
    ]
    if meta.get("created"):
        rows.insert(1, ("created", str(meta["created"])))
    config = _config(meta)
    if config:
        rows.insert(3, ("config", config))
    # An incomplete (live or crashed) trace or a partial set of shards says so on page 1.
    rows[1:1] = [("warning", _short(w, 90)) for w in meta.get("warnings") or []]
    return rows


def _short(path: str, width: int = 60) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def _recorded(data: ReportData) -> str:
    parts = ["per-sample gradient norms"]
    if data.has_outputs:
        parts.append("logits/targets")
    if data.has_thumbnails:
        parts.append("thumbnails")
    return ", ".join(parts)


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page(data.report_title or "samplescope report", caption_lines=4)
    left = fig.add_axes((0.04, 0.32, 0.44, 0.54))
    left.set_title("Run", loc="left", fontweight="bold")
    draw_table(left, ["", ""], [(k, v) for k, v in run_rows(data)], col_widths=[0.35, 0.65])
    _left_align(left)

    right = fig.add_axes((0.53, 0.56, 0.44, 0.30))
    right.set_title("Recorded layers (L0 nearest the input)", loc="left", fontweight="bold")
    total = int(data.layers["n_params"].sum())
    rows = [
        (f"L{r['layer_index']}", r["layer"], r["kind"], f"{r['n_params']:,}")
        for r in data.layers.iter_rows(named=True)
    ]
    rows.append(("", "total", "", f"{total:,}"))
    draw_table(
        right, ["#", "module", "kind", "parameters"], rows, col_widths=[0.1, 0.4, 0.25, 0.25]
    )

    contents = fig.add_axes((0.53, 0.14, 0.44, 0.36))
    contents.axis("off")
    contents.set_title("In this report", loc="left", fontweight="bold")
    lines = [f"•  {title}  [{sid}]" for sid, title in data.included]
    lines += [f"–  left out: {title} [{sid}] — {why}" for sid, title, why in data.omitted]
    contents.text(
        0.0,
        1.0,
        "\n".join(lines),
        va="top",
        ha="left",
        fontsize=9,
        linespacing=1.6,
        transform=contents.transAxes,
        wrap=True,
    )
    add_caption(
        fig,
        (
            "Importance of a sample for a layer is the squared size of the parameter change the "
            "sample caused in that layer under SGD, (lr·s)²·‖g‖², with s = 1/batch size for a "
            "mean-reduced loss (Gao & Jojic). Difficulty is the rank of a sample's final training "
            "loss: decile 0 holds the easiest 10% of samples, decile 9 the hardest. "
            + (
                ""
                if data.has_outputs
                else "This trace has no logits/targets, so the sections "
                "that need predictions, confidences or labels are left out (listed above)."
            )
        ),
    )
    yield fig


def _left_align(ax: Any) -> None:
    for table in ax.tables:
        for (row, col), cell in table.get_celld().items():
            cell.set_text_props(ha="left")
            cell.PAD = 0.02
            if row == 0:
                cell.set_visible(False)
            if col == 0:
                cell.set_text_props(fontweight="bold")


SECTION = Section("summary", "Run summary", _pages)
