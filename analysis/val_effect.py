"""Validation attribution: each sample's first-order effect on the reference (validation) loss.

A recorded SGD step moves the parameters by −η·s·Σ_i g_i (η the learning rate, s the
reduction scale: 1/B for a mean, 1 for a sum), so, to first order, sample i's part of it
changes the validation loss by

    Δ_i L_val = −η·s·Σ_l ⟨g(i,l), g_val(l)⟩,

from `/visits/val_dot` (``Recorder(reference=...)``). Negative: the sample's update lowered
the validation loss (it helped); positive: it hurt. With ``reference_every = k`` only every
k-th step measured it; each measured visit then stands for k steps and is multiplied by k,
an unbiased estimate of the sum over every visit when a sample's steps are spread evenly
over the residues mod k (shuffled epochs; a fixed order with k dividing the epoch length
would always measure the same samples — then k = 1). The sum over the measured visits
alone is ``val_effect_measured``. SGD's update is what this describes: with momentum or
Adam the step is not −η·s·g, and the score is the SGD first-order term only.

Reads HDF5 only (no torch); memory follows (sample, epoch, layer) rows, not visits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from samplescope.analysis._hdf5 import Shard, TraceData, _ShardSteps

__all__ = ["VAL_EFFECT_SCHEMA", "has_val_dot", "sample_val_effect", "val_effect_table"]

VAL_EFFECT_SCHEMA = {
    "sample_id": pl.Int64,
    "epoch": pl.Int64,
    "layer": pl.String,
    "val_effect": pl.Float64,
    "val_effect_measured": pl.Float64,
    "n_measured": pl.Int64,
}
_BLOCK_ROWS = 1 << 16


def has_val_dot(data: TraceData) -> bool:
    """Whether every shard of the trace recorded ``/visits/val_dot``."""
    return bool(data.shards) and data.has_visit_column("val_dot")


def val_effect_table(data: TraceData) -> pl.DataFrame:
    """One row per (sample, epoch, layer): the summed first-order validation-loss change.

    Columns: sample_id, epoch, layer, val_effect (scaled by reference_every),
    val_effect_measured (measured visits only), n_measured (visits measured). Empty (with
    these columns) for a trace without ``val_dot``.
    """
    parts: list[pl.DataFrame] = []
    if has_val_dot(data):
        names = list(data.layer_names)
        for steps in data.steps:
            every = int((steps.shard.attrs.get("options") or {}).get("reference_every", 1) or 1)
            factor = -steps.lr_scale
            mask = steps.step % every == 0
            for lo, hi, index in steps.ranges(mask):
                rows_step = np.repeat(index, steps.batch_size[index])
                for start in range(lo, hi, _BLOCK_ROWS):
                    stop = min(start + _BLOCK_ROWS, hi)
                    which = rows_step[start - lo : stop - lo]
                    block = _block(steps.shard, (start, stop), which, steps, factor, names)
                    parts.append(block.with_columns(pl.lit(float(every)).alias("_every")))
    if not parts:
        return pl.DataFrame(schema=VAL_EFFECT_SCHEMA)
    every_col = pl.col("_every")
    return (
        pl.concat(parts)
        .group_by("sample_id", "epoch", "layer")
        .agg(
            (pl.col("effect") * every_col).sum().alias("val_effect"),
            pl.col("effect").sum().alias("val_effect_measured"),
            pl.col("n").sum().cast(pl.Int64).alias("n_measured"),
        )
        .sort("sample_id", "epoch", "layer")
        .select(list(VAL_EFFECT_SCHEMA))
    )


def _block(
    shard: Shard,
    rows: tuple[int, int],
    which: np.ndarray,
    steps: _ShardSteps,
    factor: np.ndarray,
    names: list[str],
) -> pl.DataFrame:
    """Rows ``rows`` of /visits summed per (sample, epoch, layer); ``which``: their steps."""
    dots = shard.read("visits", "val_dot", *rows).astype(np.float64)
    ids = shard.read("visits", "sample_id", *rows).astype(np.int64)
    effect = dots * factor[which][:, None]
    n_rows, n_layers = effect.shape
    return (
        pl.DataFrame(
            {
                "sample_id": np.repeat(ids, n_layers),
                "epoch": np.repeat(steps.epoch[which].astype(np.int64), n_layers),
                "layer": np.tile(np.asarray(names[:n_layers], dtype=object), n_rows),
                "effect": effect.reshape(-1),
                "n": np.ones(n_rows * n_layers, dtype=np.int64),
            },
            schema_overrides={"layer": pl.String},
        )
        .filter(pl.col("effect").is_not_nan())
        .group_by("sample_id", "epoch", "layer")
        .agg(pl.col("effect").sum(), pl.col("n").sum())
    )


def sample_val_effect(table: pl.DataFrame) -> pl.DataFrame:
    """Per sample: val_effect and val_effect_measured summed over epochs and layers.

    ``n_val_measured`` counts the sample's measured visits (per visit, not per layer).
    """
    n_layers = max(table.get_column("layer").n_unique(), 1) if table.height else 1
    return (
        table.group_by("sample_id")
        .agg(
            pl.col("val_effect").sum(),
            pl.col("val_effect_measured").sum(),
            (pl.col("n_measured").sum() // n_layers).cast(pl.Int64).alias("n_val_measured"),
        )
        .sort("sample_id")
    )
