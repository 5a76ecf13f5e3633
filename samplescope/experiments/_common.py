"""Helpers shared by the experiments: the recorded reference run and its scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from samplescope.experiments.config import ExperimentError, RunConfig
from samplescope.experiments.data import Dataset
from samplescope.experiments.train import early_checkpoint, train_run

__all__ = ["ExperimentError", "mean_std", "reference_run", "reference_scores"]


def reference_run(
    config: RunConfig, out_dir: Path, recorder_options: dict[str, Any] | None = None
) -> tuple[Dataset, np.ndarray, pl.DataFrame]:
    """Train and record the seed-0 reference run that scores every training sample.

    Returns the dataset, the training ids and `reference_scores` of the run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = config.load()
    ids = config.train_ids(data)
    reference = out_dir / "reference.h5"
    train_run(
        config.with_seed(0),
        reference,
        data=data,
        train_indices=ids,
        thumbnails=False,
        overwrite=True,
        progress=False,
        recorder_options=recorder_options,
        checkpoint_epochs=early_checkpoint(config.epochs),
    )
    return data, ids, reference_scores(reference, ids)


def reference_scores(trace_path: str | Path, ids: np.ndarray) -> pl.DataFrame:
    """Every score of `samplescope.analysis.flags.score_table`, one row per id in ``ids``."""
    from samplescope.analysis import open_trace
    from samplescope.analysis.flags import score_table

    with open_trace(trace_path) as trace:
        table = score_table(trace)
    order = pl.DataFrame({"sample_id": ids.astype(np.int64)})
    return order.join(table, on="sample_id", how="left")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
