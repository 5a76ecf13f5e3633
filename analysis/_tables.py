"""The small tables of a trace, read whole from HDF5: layers, steps, evals, sample_info,
checkpoints, sample_names (one row per layer, step, evaluation, sample or checkpoint
sample)."""

from __future__ import annotations

import numpy as np
import polars as pl

from samplescope.analysis._hdf5 import TraceData
from samplescope.analysis.errors import QueryError

__all__ = ["SMALL_TABLES", "small_table"]

SMALL_TABLES = ("layers", "steps", "evals", "sample_info", "checkpoints", "sample_names")


def small_table(data: TraceData, name: str) -> pl.DataFrame:
    """A table read whole from HDF5: layers, steps, evals, sample_info, checkpoints or
    sample_names.

    Raises:
        QueryError: an optional table this trace lacks, or an unknown name.
    """
    if name == "checkpoints":
        return _checkpoint_table(data)
    if name == "sample_names":
        return _sample_names_table(data)
    if name == "layers":
        cols = data.group_table("layers")
        n = len(cols["name"])
        return pl.DataFrame(
            {
                "layer_index": np.arange(n, dtype=np.int64),
                "layer": cols["name"].astype(str).tolist(),
                "kind": _strings(cols, "kind", n),
                "n_params": _ints(cols, "n_params", n),
                "method": _strings(cols, "method", n),
            },
            schema={
                "layer_index": pl.Int64,
                "layer": pl.String,
                "kind": pl.String,
                "n_params": pl.Int64,
                "method": pl.String,
            },
        )
    if name == "steps":
        cols = data.step_frame_arrays()
        return pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
    if name == "evals":
        schema = {
            "step": pl.Int64,
            "epoch": pl.Int64,
            "split": pl.String,
            "loss": pl.Float64,
            "accuracy": pl.Float64,
        }
        cols = data.group_table("evals") if data.shards[0].has("evals") else {}
        frame = pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
        for key, dtype in schema.items():
            if key not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(key))
        return frame.select(*schema, *[c for c in frame.columns if c not in schema])
    if name == "sample_info":
        if not data.shards[0].has("sample_info"):
            msg = "this trace has no /sample_info (pass sample_info= to the Recorder)"
            raise QueryError(msg)
        cols = data.group_table("sample_info")
        return pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
    msg = f"unknown table {name!r}"
    raise QueryError(msg)


def _sample_names_table(data: TraceData) -> pl.DataFrame:
    """sample_id -> sample_name, where the recorder was given string sample ids."""
    names = data.sample_names()
    if names is None:
        msg = "this trace has no /sample_names (its sample ids were integers)"
        raise QueryError(msg)
    return pl.DataFrame(
        {"sample_id": names["sample_id"], "sample_name": names["name"].tolist()},
        schema={"sample_id": pl.Int64, "sample_name": pl.String},
    )


def _checkpoint_table(data: TraceData) -> pl.DataFrame:
    cols = data.checkpoint_arrays()
    if cols is None:
        msg = "this trace has no /checkpoints (pass checkpoints=True to the Recorder)"
        raise QueryError(msg)
    grad_sq = np.asarray(cols["grad_sq"], dtype=np.float32).reshape(len(cols["sample_id"]), -1)
    frame = pl.DataFrame(
        {
            k: _series(k, v)
            for k, v in cols.items()
            if k not in ("grad_sq", "target", "pred", "p_target", "margin", "el2n")
        }
    )
    target = np.asarray(cols.get("target", np.full(frame.height, -1)), dtype=np.int64)
    missing = target < 0
    outputs = {}
    for name in ("target", "pred"):
        values = np.asarray(cols.get(name, np.full(frame.height, -1)), dtype=np.int64)
        outputs[name] = pl.Series(name, values, dtype=pl.Int64).scatter(
            np.flatnonzero(missing), None
        )
    for name in ("p_target", "margin", "el2n"):
        values = np.asarray(cols.get(name, np.full(frame.height, np.nan)), dtype=np.float32)
        outputs[name] = pl.Series(name, np.where(missing, np.nan, values)).fill_nan(None)
    return frame.with_columns(
        *outputs.values(),
        pl.Series("grad_sq", grad_sq.tolist(), dtype=pl.List(pl.Float32)),
        pl.Series("grand", np.sqrt(grad_sq.astype(np.float64).sum(1))),
    ).select(
        "checkpoint",
        "step",
        "epoch",
        "sample_id",
        "loss",
        "target",
        "pred",
        "p_target",
        "margin",
        "el2n",
        "grad_sq",
        "grand",
    )


def _strings(cols: dict[str, np.ndarray], key: str, n: int) -> list[str]:
    return cols[key].astype(str).tolist() if key in cols else [""] * n


def _ints(cols: dict[str, np.ndarray], key: str, n: int) -> list[int]:
    return cols[key].astype(np.int64).tolist() if key in cols else [0] * n


def _series(name: str, values: np.ndarray) -> pl.Series:
    if values.ndim == 2:
        return pl.Series(name, values, dtype=pl.Array(pl.Float32, values.shape[1]))
    if values.dtype == object:
        return pl.Series(name, values.tolist(), dtype=pl.String)
    return pl.Series(name, values)
