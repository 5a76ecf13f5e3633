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

from samplescope._paths import atomic_output, same_file
from samplescope.errors import SamplescopeError

__all__ = [
    "FORMATS",
    "CommandError",
    "format_table",
    "frame_output",
    "one_line",
    "warn_about",
    "write_frame",
]

FORMATS = ("table", "csv", "json", "ndjson", "parquet")
F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A user mistake reported in one line with exit status 2."""

    exit_code = 2


def warn_about(trace: Any) -> None:
    """Print the trace's warnings (incomplete file, missing ranks) to stderr, one a line."""
    for warning in getattr(trace, "warnings", []):
        click.echo(f"Warning: {warning}", err=True)


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


def _simple(dtype: pl.DataType) -> bool:
    """Polars writes this dtype to CSV (after `_flat`) and JSON itself: not bytes, objects,
    structs or maps (DuckDB MAP arrives as a list of key/value structs)."""
    if isinstance(dtype, (pl.List, pl.Array)):
        return dtype.inner.is_numeric() or dtype.inner == pl.String
    return not dtype.is_nested() and dtype not in (pl.Binary, pl.Object)


def _flat(frame: pl.DataFrame) -> pl.DataFrame:
    """Nested columns as text, for CSV: arrays of numbers comma-separated (grad_sq), anything
    else (structs, maps, bytes) as JSON text, bytes as hex."""
    out = []
    for name, dtype in frame.schema.items():
        if not _simple(dtype):
            texts = [_json_text(v) for v in frame.get_column(name).to_list()]
            out.append(pl.Series(name, texts, dtype=pl.String))
            continue
        column = frame.get_column(name)
        if isinstance(dtype, pl.Array):
            column = column.arr.to_list()
        if isinstance(dtype, (pl.Array, pl.List)):
            column = column.cast(pl.List(pl.String)).list.join(",")
        out.append(column.alias(name))
    return pl.DataFrame(out)


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(_jsonable(value), default=str)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _json(frame: pl.DataFrame) -> str:
    if all(_simple(dtype) for dtype in frame.dtypes):
        return frame.write_json()
    # Polars cannot write bytes or maps as JSON (a panic for bytes): rows built here.
    rows = [_jsonable(row) for row in frame.iter_rows(named=True)]
    return json.dumps(rows, default=str)


def _ndjson(frame: pl.DataFrame) -> str:
    if all(_simple(dtype) for dtype in frame.dtypes):
        return frame.write_ndjson()
    rows = (_jsonable(row) for row in frame.iter_rows(named=True))
    return "".join(json.dumps(row, default=str) + "\n" for row in rows)


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
        with atomic_output(output) as temp:
            frame.write_parquet(temp)
        return
    if fmt == "csv":
        text = _flat(frame).write_csv()
    elif fmt == "json":
        text = _json(frame) + "\n"
    elif fmt == "ndjson":
        # One JSON object per line: streams into jq, pandas.read_json(lines=True), duckdb.
        text = _ndjson(frame)
    else:
        text = format_table(frame) + "\n"
    _emit(text, output)


def _emit(text: str, output: str | None) -> None:
    if output is None:
        click.echo(text, nl=False)
    else:
        with atomic_output(output) as temp:
            temp.write_text(text, encoding="utf-8")


_INPUT_OPTIONS = ("trace", "traces", "out")


def _refuse_input_as_output(output: str, kwargs: dict[str, Any]) -> None:
    """--output may not name a trace the command reads or writes (`train --out X -o X`)."""
    for key in _INPUT_OPTIONS:
        value = kwargs.get(key)
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, (str, Path)) and same_file(output, path):
                msg = f"--output {output} is also the trace {path}; choose another output file"
                raise CommandError(msg)


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
        if output is not None:
            _refuse_input_as_output(output, kwargs)
        try:
            frame = func(*args, **kwargs)
        except SamplescopeError as error:
            raise CommandError(one_line(error)) from None
        try:
            write_frame(frame, fmt, output)
        except OSError as error:
            raise CommandError(f"cannot write {output}: {error.strerror or error}") from None

    return wrapper  # type: ignore[return-value]
