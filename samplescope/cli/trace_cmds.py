"""`samplescope info | sql | samples | compare`: thin skins over `samplescope.analysis`."""

from __future__ import annotations

import json
from typing import Any

import click
import polars as pl

from samplescope.analysis import compare_traces, open_trace
from samplescope.cli.output import frame_output, warn_about

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the trace commands to `group` (the root `samplescope` group)."""
    for command in (info, sql, samples, compare):
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
def info(trace: tuple[str, ...]) -> pl.DataFrame:
    """Show what a trace holds: run attributes, counts, layers, recorded columns.

    TRACE is one .h5 file, several shard files of one run, or a quoted glob.

    Example: samplescope info runs/exp1.h5
    """
    with open_trace(list(trace)) as t:
        warn_about(t)
        return t.summary()


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
        return t.samples(early_epochs=early_epochs, sort=sort, descending=not ascending, top=top)


@click.command()
@click.argument("traces", nargs=-1, required=True)
@frame_output
def compare(traces: tuple[str, ...]) -> pl.DataFrame:
    """Spearman correlation of per-sample importance between runs on the same data,
    per epoch and overall (epoch null), for every pair of TRACES.

    Example: samplescope compare runs/seed0.h5 runs/seed1.h5 runs/seed2.h5
    """
    return compare_traces(list(traces))
