"""The derived tables of a trace — samples, sample_epochs, correlations, groups, clusters —
computed from the streaming engine (`_streaming.stream`) on first use and cached.

One pass of the engine gives the per-sample aggregates, the per-(sample, epoch) rollup and
the period sums; every table here, and `findings`, `flag` and `compare`, is built from them,
so the visits are read once per session and never held whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from samplescope.analysis import scores, val_effect
from samplescope.analysis._findings_data import PERIOD_FRACTION
from samplescope.analysis._hdf5 import TraceData
from samplescope.analysis._streaming import Streamed, stream
from samplescope.analysis.errors import EmptyTraceError, QueryError

__all__ = ["DEFAULT_K", "DERIVED_TABLES", "Derived"]

DERIVED_TABLES = ("samples", "sample_epochs", "correlations", "groups", "clusters", "val_effect")
DEFAULT_K = 20


class Derived:
    """The derived tables of one trace and their cache.

    Args:
        data: the trace's HDF5 side.
        path: the trace's first file (for messages).
        small: the trace's small tables by name (layers, sample_info, checkpoints,
            sample_names).
        table_names: the names of the tables the trace offers.
    """

    def __init__(
        self,
        data: TraceData,
        path: Path,
        small: Callable[[str], pl.DataFrame],
        table_names: Callable[[], list[str]],
    ) -> None:
        self._data = data
        self._path = path
        self._small = small
        self._table_names = table_names
        self._frames: dict[object, pl.DataFrame] = {}
        self._full: Streamed | None = None

    def _check(self) -> None:
        if self._data.n_visits == 0 or self._data.n_layers == 0:
            msg = (
                f"{self._path} has no recorded visits yet"
                if self._data.n_layers
                else f"{self._path} has no layers"
            )
            raise EmptyTraceError(msg)

    def streamed(self) -> Streamed:
        """The engine's full pass (early_epochs=1, with the per-(sample, epoch) rollup and
        the periods), cached."""
        if self._full is None:
            self._check()
            self._full = stream(self._data, 1, PERIOD_FRACTION)
        return self._full

    def _per_sample(self, early_epochs: int) -> pl.DataFrame:
        """Per-sample aggregates: from the full pass when it ran, else from a light pass
        that keeps nothing per (sample, epoch)."""
        if early_epochs == 1 and self._full is not None:
            return self._full.per_sample
        self._check()
        return stream(self._data, early_epochs).per_sample

    def rollup(self) -> pl.DataFrame:
        """Per (sample, epoch): sample_id, epoch, n_visits, loss (mean), importance_<l>,
        grad_sq_<l>; sorted by epoch then sample_id."""
        rollup = self.streamed().rollup
        assert rollup is not None
        return rollup

    def samples(self, early_epochs: int = 1) -> pl.DataFrame:
        """One row per sample with every score, sorted by sample_id (cached)."""
        key = ("samples", early_epochs)
        if key not in self._frames:
            names = self._table_names()
            info = self._small("sample_info") if "sample_info" in names else None
            per_sample = self._per_sample(early_epochs)
            frame = scores.finish_sample_scores(per_sample, self._data.n_layers, info)
            if "checkpoints" in names and self._small("checkpoints").height:
                # Data Diet's scores at fixed checkpoints, where the trace has some.
                frame = frame.join(
                    scores.checkpoint_scores(self._small("checkpoints")),
                    on="sample_id",
                    how="left",
                )
            if "val_effect" in names:
                # Validation attribution, where the trace recorded a reference batch.
                frame = frame.join(
                    val_effect.sample_val_effect(self.val_effect()), on="sample_id", how="left"
                )
            if "sample_names" in names:  # string sample ids: their names beside them
                frame = frame.join(self._small("sample_names"), on="sample_id", how="left")
                frame = frame.select(
                    "sample_id", "sample_name", pl.exclude("sample_id", "sample_name")
                )
            self._frames[key] = frame
        return self._frames[key]

    def sample_epochs(self) -> pl.DataFrame:
        """The long per-(sample, epoch, layer) table (cached: it is what the caller asked
        for; the library's own tables read the rollup)."""
        if "sample_epochs" not in self._frames:
            self._frames["sample_epochs"] = scores.sample_epochs(
                self.rollup(), self._small("layers")
            )
        return self._frames["sample_epochs"]

    def correlations(self) -> pl.DataFrame:
        if "correlations" not in self._frames:
            self._frames["correlations"] = scores.correlations(
                self.rollup(), self.samples(), self._small("layers")
            )
        return self._frames["correlations"]

    def groups(self) -> pl.DataFrame:
        if "groups" not in self._frames:
            self._frames["groups"] = scores.groups(self.samples(), self._small("layers"))
        return self._frames["groups"]

    def clusters(self, k: int = DEFAULT_K, seed: int = 0) -> pl.DataFrame:
        from samplescope.analysis.clusters import cluster_samples

        key = ("clusters", k, seed)
        if key not in self._frames:
            if k < 1:
                msg = f"k must be at least 1, got {k}"
                raise QueryError(msg)
            self._frames[key] = cluster_samples(self.rollup(), self.samples(), k=k, seed=seed)
        return self._frames[key]

    def val_effect(self) -> pl.DataFrame:
        """Long table of validation attribution (analysis/val_effect.py), cached."""
        if "val_effect" not in self._frames:
            table = val_effect.val_effect_table(self._data)
            index = self._small("layers").select("layer", "layer_index")
            self._frames["val_effect"] = table.join(index, on="layer", how="left").select(
                "sample_id",
                "epoch",
                "layer",
                "layer_index",
                "val_effect",
                "val_effect_measured",
                "n_measured",
            )
        return self._frames["val_effect"]
