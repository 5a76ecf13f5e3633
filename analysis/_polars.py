"""The Polars side of a trace: `visits` and `importance` as lazy frames over HDF5.

A Polars IO plugin (`register_io_source`) reads only the columns a query selects, and, when
its filter names only step and epoch, only those steps' rows of /visits. Nothing is cached:
a lazy frame reads when collected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
from polars.io.plugins import register_io_source

from samplescope.analysis._hdf5 import VISIT_COLUMNS, TraceData, visit_type
from samplescope.analysis._importance import polars_expr
from samplescope.analysis.errors import EmptyTraceError

__all__ = ["importance_lazy", "scan_visits", "visits_schema"]


def _visits_frame(
    data: TraceData, columns: Sequence[str], masks: list[np.ndarray] | None = None
) -> pl.DataFrame:
    arrays = {c: data.visit_column(c, masks) for c in columns}
    return pl.from_arrow(pa.table(arrays))  # type: ignore[return-value]


def visits_schema(n_layers: int) -> dict[str, pl.DataType]:
    """The Polars schema of the visits table."""
    empty = pa.table({c: pa.array([], type=visit_type(c, n_layers)) for c in VISIT_COLUMNS})
    return dict(pl.from_arrow(empty).schema)  # type: ignore[union-attr]


def scan_visits(data: TraceData) -> pl.LazyFrame:
    """The visits table as a LazyFrame whose source reads only the projected columns, and
    only the row ranges of the steps a filter on step/epoch keeps."""
    schema = visits_schema(data.n_layers)
    step_frames = [pl.DataFrame({"step": s.step, "epoch": s.epoch}) for s in data.steps]

    def source(
        with_columns: list[str] | None,
        predicate: pl.Expr | None,
        n_rows: int | None,
        batch_size: int | None,
    ) -> Iterator[pl.DataFrame]:
        del batch_size
        columns = list(with_columns or schema)
        needed = set(columns)
        masks = None
        if predicate is not None:
            roots = set(predicate.meta.root_names())
            needed |= roots
            if roots <= {"step", "epoch"}:
                # Slice /visits by the steps the predicate keeps: read only their rows.
                masks = [
                    f.select(predicate.fill_null(False)).to_series().to_numpy() for f in step_frames
                ]
        frame = _visits_frame(data, [c for c in schema if c in needed], masks)
        if predicate is not None:
            frame = frame.filter(predicate)
        frame = frame.select(columns)
        yield frame if n_rows is None else frame.head(n_rows)

    return register_io_source(source, schema=schema, explain_name="samplescope visits")


def importance_lazy(data: TraceData, layers: pl.DataFrame) -> pl.LazyFrame:
    """The importance table as a LazyFrame over `scan_visits` (one slice per layer)."""
    visits = scan_visits(data)
    parts = []
    for row in layers.iter_rows(named=True):
        index = row["layer_index"]
        grad = pl.col("grad_sq").arr.get(index).cast(pl.Float64)
        parts.append(
            visits.select(
                "step",
                "epoch",
                "sample_id",
                pl.lit(row["layer"], dtype=pl.String).alias("layer"),
                pl.lit(index, dtype=pl.Int64).alias("layer_index"),
                grad.alias("grad_sq"),
                polars_expr(pl.col("lr_scale"), grad).alias("importance"),
                (polars_expr(pl.col("lr_scale"), grad) / row["n_params"]).alias(
                    "importance_per_param"
                ),
                pl.col("alignment").arr.get(index).cast(pl.Float64).alias("alignment"),
                "duplicate",
            )
        )
    if not parts:
        msg = "this trace has no layers"
        raise EmptyTraceError(msg)
    return pl.concat(parts)
