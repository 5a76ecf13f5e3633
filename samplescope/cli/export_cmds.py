"""`samplescope export`: a thin skin over `samplescope.analysis.export.export_trace`."""

from __future__ import annotations

import click

from samplescope.analysis.export import export_trace

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the export command to `group` (the root `samplescope` group)."""
    group.add_command(export)


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.argument("out_dir", metavar="DIR")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it holds an earlier export.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="DuckDB threads for the per-(sample, epoch) rollup.",
)
def export(trace: tuple[str, ...], out_dir: str, overwrite: bool, threads: int) -> None:
    """Export a trace's tables as Hive-partitioned Parquet (visits/epoch=E/rank=R/), with
    its views as SQL for DuckDB or Spark (docs/trace-format.md, "The columnar form").

    TRACE is one .h5 file, several shard files of one run, or a quoted glob. DIR must not
    exist or be empty; it appears only once complete.

    Example: samplescope export runs/exp1.h5 exp1-parquet/ && cd exp1-parquet &&
    duckdb -init views.sql -c "SELECT layer, sum(importance) FROM importance GROUP BY 1"
    """
    result = export_trace(list(trace), out_dir, overwrite=overwrite, threads=threads)
    # The trace is closed by now; its warnings (a live shard, missing ranks) are kept.
    for warning in result.manifest["warnings"]:
        click.echo(f"Warning: {warning}", err=True)
    tables = result.manifest["tables"]
    click.echo(
        f"wrote {result.path}: {tables['visits']['rows']:,} visits in "
        f"{tables['visits']['files']} files, {len(tables) - 1} other tables, "
        f"views in {result.path / 'views.sql'}"
    )
