"""Importance, defined once: the squared norm of the parameter change a sample caused in a
layer under plain SGD, ``(lr · s)² · grad_sq`` (docs/analysis.md).

The trace's tables compute it in three engines — numpy (the streaming engine behind every
per-sample table), DuckDB SQL (the `importance` view) and Polars (`t.table("importance")`)
— and each takes its expression from here, so the formula, its multiplication order and
its float types are written in one place. tests/analysis/test_engine_pins.py checks that
the three give the same sums.
"""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["per_visit", "polars_expr", "sql_expr"]


def per_visit(lr_scale: np.ndarray, grad_sq: np.ndarray) -> np.ndarray:
    """[visits, layers] importance from lr·s [visits] and grad_sq [visits, layers].

    (lr·s)² is taken in float64 and multiplies the float64 grad_sq, as in the SQL view.
    """
    scale = np.asarray(lr_scale, dtype=np.float64)
    return (scale * scale)[:, None] * np.asarray(grad_sq, dtype=np.float64)


def sql_expr(scale_sq: str, grad_sq: str) -> str:
    """The SQL expression over a DOUBLE ``scale_sq = (lr·s)²`` and a layer's grad_sq column."""
    return f"{scale_sq} * {grad_sq}"


def polars_expr(lr_scale: pl.Expr, grad_sq: pl.Expr) -> pl.Expr:
    """The Polars expression over lr·s and one layer's grad_sq (cast to Float64)."""
    return (lr_scale * lr_scale) * grad_sq.cast(pl.Float64)
