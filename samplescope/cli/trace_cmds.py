"""`samplescope info | tables | schema | sql | samples | compare`: thin skins over
`samplescope.analysis`."""

from __future__ import annotations

import json
from typing import Any

import click
import polars as pl

from samplescope.analysis import compare_traces, open_trace
from samplescope.analysis.trace import TABLES
from samplescope.cli.help import ListedOption
from samplescope.cli.output import CommandError, frame_output, warn_about

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the trace commands to `group` (the root `samplescope` group)."""
    for command in (info, tables, schema, sql, samples, compare):
        group.add_command(command)


def _param(text: str) -> Any:
    """A --param value: JSON if it parses (numbers, true, null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@click.command()
@click.argument("trace", nargs=-1, required=True)
@frame_output
def info(trace: tuple[str, ...]) -> dict[str, Any]:
    """Show what a trace holds: run attributes, counts, layers, recorded columns.

    TRACE is one .h5 file, several shard files of one run, or a quoted glob.

    Example: samplescope info runs/exp1.h5
    """
    with open_trace(list(trace)) as t:
        warn_about(t)
        summary = t.summary()
    # JSON-valued attributes (config, options, ...) come back as objects, not as JSON text
    # inside JSON.
    return {key: _json_value(value) for key, value in summary.iter_rows()}


def _json_value(text: Any) -> Any:
    """A summary value as JSON would hold it: objects, lists, numbers and booleans parsed,
    other text kept."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@click.command()
@click.argument("trace", nargs=-1, required=True)
@frame_output
def tables(trace: tuple[str, ...]) -> pl.DataFrame:
    """List the tables `sql` can query in a trace, with their number of columns.

    Example: samplescope tables runs/exp1.h5
    """
    with open_trace(list(trace)) as t:
        names = t.table_names
        widths = [len(t.table(name).collect_schema()) for name in names]
    return pl.DataFrame({"table": names, "columns": widths})


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option(
    "--table",
    "-t",
    "table",
    cls=ListedOption,
    names=lambda: TABLES,
    default=None,
    help="Only this table's columns: {names}.",
)
@frame_output
def schema(trace: tuple[str, ...], table: str | None) -> pl.DataFrame:
    """List every column of a trace's tables (or of one, with --table) and its type.

    Example: samplescope schema runs/exp1.h5 --table samples
    """
    with open_trace(list(trace)) as t:
        names = t.table_names
        if table is not None and table not in names:
            msg = f"unknown table {table!r}; choose from {', '.join(names)}"
            raise CommandError(msg)
        rows = [
            (name, column, str(dtype))
            for name in ([table] if table else names)
            for column, dtype in t.table(name).collect_schema().items()
        ]
    return pl.DataFrame(rows, schema=["table", "column", "type"], orient="row")


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.argument("query")
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    help="Value for the next ? placeholder (JSON, else text); repeatable.",
)
@frame_output
def sql(trace: tuple[str, ...], query: str, params: tuple[str, ...]) -> pl.DataFrame:
    """Run a DuckDB SQL query over a trace's tables (see docs/analysis.md).

    Tables: layers, steps, visits, importance, samples, sample_epochs, correlations,
    groups, clusters, evals, sample_info.

    Example: samplescope sql runs/exp1.h5 "SELECT epoch, avg(importance) FROM importance
    GROUP BY 1 ORDER BY 1" --format csv
    """
    with open_trace(list(trace)) as t:
        warn_about(t)
        return t.query(query, [_param(p) for p in params] or None)


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option("--sort", "sort", default=None, help="Column to sort by (descending).")
@click.option("--ascending", is_flag=True, help="Sort ascending instead.")
@click.option("--top", type=click.IntRange(min=0), default=None, help="Keep the first N rows.")
@click.option(
    "--early-epochs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="First recorded epochs used by grand and el2n_proxy.",
)
@frame_output
def samples(
    trace: tuple[str, ...], sort: str | None, ascending: bool, top: int | None, early_epochs: int
) -> pl.DataFrame:
    """One row per sample with every score: importance and its share per layer, when and
    where it mattered, difficulty, cartography, forgetting, AUM, EL2N proxy, GraNd, TracIn.

    Example: samplescope samples runs/exp1.h5 --sort importance --top 20
    """
    with open_trace(list(trace)) as t:
        warn_about(t)
        frame = t.samples(early_epochs=early_epochs, sort=sort, descending=not ascending, top=top)
        names = t.class_names
    return _with_class_names(frame, names)


def _with_class_names(frame: pl.DataFrame, names: list[str] | None) -> pl.DataFrame:
    """Add ``class`` (the label's name) after ``target`` when the trace stores class names."""
    if names is None or "target" not in frame.columns:
        return frame
    lookup = pl.DataFrame(
        {"target": list(range(len(names))), "class": names},
        schema={"target": frame.schema["target"], "class": pl.String},
    )
    order = list(frame.columns)
    order.insert(order.index("target") + 1, "class")
    return frame.join(lookup, on="target", how="left", maintain_order="left").select(order)


@click.command()
@click.argument("traces", nargs=-1, required=True)
@frame_output
def compare(traces: tuple[str, ...]) -> pl.DataFrame:
    """Spearman correlation of per-sample importance between runs on the same data,
    per epoch and overall (epoch null), for every pair of TRACES.

    Example: samplescope compare runs/seed0.h5 runs/seed1.h5 runs/seed2.h5
    """
    _check_same_data(traces)
    return compare_traces(list(traces))


# Below this share of common samples with matching labels, two runs are on different data.
MIN_SHARED = 0.99


def _check_same_data(traces: tuple[str, ...]) -> None:
    """Refuse runs that do not share their samples: the same sample id must exist in both
    and carry the same label (when labels were recorded)."""
    labels = []
    for path in traces:
        with open_trace(path) as t:
            target = "any_value(target)" if t.meta.get("has_outputs") else "NULL::BIGINT"
            labels.append(
                t.sql(f"SELECT sample_id, {target} AS target FROM visits GROUP BY 1").pl()
            )
    first = labels[0]
    for path, other in zip(traces[1:], labels[1:], strict=True):
        joined = first.join(other, on="sample_id", suffix="_b")
        smaller = min(first.height, other.height) or 1
        same = joined.filter(
            pl.col("target").is_null()
            | pl.col("target_b").is_null()
            | (pl.col("target") == pl.col("target_b"))
        ).height
        if same < MIN_SHARED * smaller:
            msg = (
                f"{traces[0]} and {path} do not share their data: only {same:,} of "
                f"{smaller:,} samples have the same id and label in both; compare runs "
                "trained on the same samples (the same split), e.g. seeds of one setting"
            )
            raise CommandError(msg)
