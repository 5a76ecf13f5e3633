"""One output decorator for every command that returns a Polars frame.

`@frame_output` adds `--format table|csv|json|ndjson|parquet` and `--output FILE`; the
command returns a `pl.DataFrame` (or, for key/value facts such as `info`, a dict, which
json and ndjson write as one object) and the decorator writes it. It also turns
`SamplescopeError` into a one-line `Error: ...` with exit status 2, so commands behave the
same under any group.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import polars as pl

from samplescope.errors import SamplescopeError

__all__ = ["FORMATS", "CommandError", "format_table", "frame_output", "one_line", "write_frame"]

FORMATS = ("table", "csv", "json", "ndjson", "parquet")
F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A user mistake reported in one line with exit status 2."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """An exception's message on one line (never empty)."""
    return " ".join(str(error).split()) or type(error).__name__


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(value) if math.isnan(value) or math.isinf(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def format_table(frame: pl.DataFrame) -> str:
    """Every row of `frame` as an aligned text table: numbers right-aligned, text left."""
    headers = frame.columns
    cells = [[_cell(v) for v in row] for row in frame.iter_rows()]
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rows = [line(headers), "  ".join("-" * w for w in widths)]
    rows += [line(r) for r in cells]
    return "\n".join(rows)


def _flat(frame: pl.DataFrame) -> pl.DataFrame:
    """Nested columns (grad_sq arrays) as comma-separated text, for CSV."""
    out = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Array):
            column = column.arr.to_list()
            dtype = pl.List(dtype.inner)
        if isinstance(dtype, pl.List):
            column = column.cast(pl.List(pl.String)).list.join(",")
        out.append(column.alias(name))
    return frame.select(out)


def _facts_frame(facts: Mapping[str, Any]) -> pl.DataFrame:
    """key/value rows of `facts`, nested values as compact JSON text (for table and csv)."""
    return pl.DataFrame(
        {
            "key": list(facts),
            "value": [
                v if isinstance(v, str) else json.dumps(v, default=str) for v in facts.values()
            ],
        }
    )


def write_frame(frame: pl.DataFrame | Mapping[str, Any], fmt: str, output: str | None) -> None:
    """Write `frame` in `fmt` to `output`, or to stdout when `output` is None.

    A mapping (key/value facts) is written as one JSON object for json and ndjson, and as
    key/value rows otherwise.
    """
    if isinstance(frame, Mapping):
        if fmt in ("json", "ndjson"):
            text = json.dumps(frame, default=str, indent=None if fmt == "ndjson" else 2) + "\n"
            _emit(text, output)
            return
        frame = _facts_frame(frame)
    if fmt == "parquet":
        if output is None:
            msg = "--format parquet needs --output FILE"
            raise click.UsageError(msg)
        frame.write_parquet(output)
        return
    if fmt == "csv":
        text = _flat(frame).write_csv()
    elif fmt == "json":
        text = frame.write_json() + "\n"
    elif fmt == "ndjson":
        # One JSON object per line: streams into jq, pandas.read_json(lines=True), duckdb.
        text = frame.write_ndjson()
    else:
        text = format_table(frame) + "\n"
    _emit(text, output)


def _emit(text: str, output: str | None) -> None:
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")


def frame_output(func: F) -> F:
    """Decorate a click command body that returns a `pl.DataFrame`."""

    @click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )
    @click.option(
        "--output",
        "-o",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write to this file instead of standard output.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, fmt: str, output: str | None, **kwargs: Any) -> None:
        if fmt == "parquet" and output is None:
            msg = "--format parquet needs --output FILE"
            raise click.UsageError(msg)
        try:
            frame = func(*args, **kwargs)
        except SamplescopeError as error:
            raise CommandError(one_line(error)) from None
        try:
            write_frame(frame, fmt, output)
        except OSError as error:
            raise CommandError(f"cannot write {output}: {error.strerror or error}") from None

    return wrapper  # type: ignore[return-value]
