"""What `findings` needs from one run, as per-sample numpy arrays, and the checks that a run
can carry a verdict at all (long enough, converged, closed, every epoch complete).

Everything is read through the analysis API (`Trace.table("visits")`, `Trace.samples()`,
`steps`, `evals`, `meta`). Importance is folded into one ``[samples, layers, epochs]`` array:
every claim is a function of per-sample sums over layers and epochs, so the bootstrap
resamples rows of that array instead of visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from samplescope.errors import SamplescopeError

if TYPE_CHECKING:
    from samplescope.analysis.trace import Trace

__all__ = [
    "MIN_DECILE",
    "MIN_EPOCHS",
    "MIN_LOSS_DROP",
    "PERIOD_FRACTION",
    "FindingsError",
    "RunData",
    "difficulty_of",
    "gather",
    "guard",
]

# The first and last fifth of training form the "early" and "late" periods of the headlines.
PERIOD_FRACTION = 0.2
# Deciles of fewer samples than this make every claim inconclusive.
MIN_DECILE = 3
# Fewer recorded epochs than this are too short to say when in training anything mattered.
MIN_EPOCHS = 5
# The last epoch's mean training loss must be at most this fraction of the first epoch's.
MIN_LOSS_DROP = 0.8
# A final test accuracy below this multiple of chance (1 / classes) means nothing was learnt.
CHANCE_MULTIPLE = 1.5
# An epoch with fewer visits than this fraction of the typical epoch is partial.
FULL_EPOCH = 0.9
_SLICE_ROWS = 1 << 18


class FindingsError(SamplescopeError):
    """Runs that cannot be compared (different data), or a difficulty source that does not fit."""


@dataclass
class RunData:
    """One run folded to per-sample arrays.

    Attributes:
        sample_ids: the samples, sorted.
        imp: importance per sample, layer and epoch, ``[S, L, E]`` (float64).
        visits: visits per sample and epoch, ``[S, E]``.
        period: importance in the early / late fifth of the steps, ``[S, L, 2]``.
        epochs: the recorded epoch values, sorted (the last axis of ``imp``).
        n_params: parameters per layer.
        kinds: module class per layer.
        final_loss: difficulty, ``[S]`` (NaN where the difficulty source lacks a sample).
        decile: difficulty decile, ``[S]`` (-1 where unknown).
        input_sq: mean ‖x‖² per sample, or None when not recorded.
        difficulty_source: where the difficulty came from, in words.
    """

    sample_ids: np.ndarray
    imp: np.ndarray
    visits: np.ndarray
    period: np.ndarray
    epochs: np.ndarray
    n_params: np.ndarray
    kinds: list[str]
    final_loss: np.ndarray
    decile: np.ndarray
    input_sq: np.ndarray | None
    difficulty_source: str

    @property
    def n_layers(self) -> int:
        return self.imp.shape[1]

    @property
    def easy(self) -> np.ndarray:
        return self.decile == 0

    @property
    def hard(self) -> np.ndarray:
        top = int(self.decile.max()) if self.decile.size else 0
        return (self.decile == top) & (top > 0)

    @property
    def input_norm_exact(self) -> bool:
        """The ‖x‖² + 1 factor is exact only for a linear first layer (see docs/analysis.md)."""
        return bool(self.kinds) and self.kinds[0] == "Linear"


def difficulty_of(trace: Trace) -> pl.DataFrame:
    """sample_id and final_loss of every sample of `trace` (the `samples` table's)."""
    return trace.samples().select("sample_id", pl.col("final_loss").cast(pl.Float64))


def _deciles(final_loss: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Difficulty deciles as in `samples` (rank by final loss, ties by id); -1 = unknown."""
    known = np.flatnonzero(~np.isnan(final_loss))
    order = known[np.lexsort((sample_ids[known], final_loss[known]))]
    decile = np.full(len(final_loss), -1, dtype=np.int64)
    decile[order] = np.arange(len(order)) * 10 // max(len(order), 1)
    return decile


def gather(trace: Trace, difficulty: pl.DataFrame | None = None, source: str = "") -> RunData:
    """Fold `trace`'s visits into a `RunData`.

    Args:
        trace: an open trace.
        difficulty: sample_id, final_loss from another run (`difficulty_of`), or None to
            use this run's own final loss.
        source: the difficulty's origin in words (for the report).

    Raises:
        FindingsError: the difficulty source shares fewer than half of this run's samples.
    """
    has_input = "input_sq" in trace.meta.get("optional_columns", [])
    # The streaming engine's per-(sample, epoch) rollup: never every visit at once.
    streamed = trace._streamed()
    layers = trace.layers().sort("layer_index")
    n_layers = layers.height
    rollup = trace._rollup()
    ids = streamed.per_sample["sample_id"].to_numpy()
    epochs = rollup["epoch"].unique().sort().to_numpy()
    n, n_epochs = len(ids), len(epochs)
    imp = np.zeros((n, n_layers, n_epochs))
    counts = np.zeros((n, n_epochs), dtype=np.int64)
    # Slice by slice (views of the rollup): no whole-rollup index or column copies.
    for part in rollup.iter_slices(_SLICE_ROWS):
        s_idx = np.searchsorted(ids, part["sample_id"].to_numpy())
        e_idx = np.searchsorted(epochs, part["epoch"].to_numpy())
        for layer in range(n_layers):
            imp[s_idx, layer, e_idx] = part[f"importance_{layer}"].to_numpy()
        counts[s_idx, e_idx] = part["n_visits"].to_numpy()
    period = streamed.period
    assert period is not None
    input_sq = None
    if has_input:
        mean = streamed.per_sample["input_sq"]
        if mean.null_count() == 0:
            input_sq = mean.to_numpy().astype(np.float64)
    own = difficulty is None
    frame = difficulty_of(trace) if own else difficulty
    loss = pl.DataFrame({"sample_id": ids}).join(frame, on="sample_id", how="left")
    final_loss = loss["final_loss"].fill_null(np.nan).to_numpy().astype(np.float64)
    if not own and np.isnan(final_loss).mean() > 0.5:
        msg = (
            f"the difficulty run {source} shares only {int((~np.isnan(final_loss)).sum())} of "
            f"this run's {n} samples; take difficulty from a run of the same data"
        )
        raise FindingsError(msg)
    return RunData(
        sample_ids=ids,
        imp=imp,
        visits=counts,
        period=period,
        epochs=epochs,
        n_params=layers["n_params"].to_numpy().astype(np.float64),
        kinds=layers["kind"].to_list(),
        final_loss=final_loss,
        decile=_deciles(final_loss, ids),
        input_sq=input_sq,
        difficulty_source="this run's final loss" if own else f"final loss in {source}",
    )


def guard(trace: Trace, data: RunData | None = None) -> str | None:
    """Why `trace` cannot carry a verdict (too short, open, partial, not converged), or None."""
    meta = trace.meta
    if not meta.get("closed", True):
        return (
            "the trace is still open (training is running, or it crashed before closing); "
            "check it once the run has finished"
        )
    steps = trace.table("steps").select("epoch", "batch_size", "loss_mean").collect()
    steps = steps.filter(pl.col("batch_size") > 0)
    per_epoch = (
        steps.group_by("epoch")
        .agg(
            pl.col("batch_size").sum().alias("visits"),
            ((pl.col("loss_mean") * pl.col("batch_size")).sum() / pl.col("batch_size").sum()).alias(
                "loss"
            ),
        )
        .sort("epoch")
    )
    if per_epoch.height < MIN_EPOCHS:
        return (
            f"the trace covers {per_epoch.height} epoch(s); at least {MIN_EPOCHS} are needed to "
            "say when in training samples mattered"
        )
    counts = per_epoch["visits"].to_numpy()
    typical = float(np.median(counts[:-1]))
    if counts[-1] < FULL_EPOCH * typical:
        return (
            f"the last epoch is partial ({int(counts[-1])} visits against {typical:.0f} in a "
            "typical epoch)"
        )
    losses = per_epoch["loss"].to_numpy()
    if not (np.isfinite(losses[0]) and np.isfinite(losses[-1])):
        return "the training loss is not finite"
    if losses[-1] > MIN_LOSS_DROP * losses[0]:
        return (
            f"training did not converge: the mean training loss went from {losses[0]:.3g} in "
            f"the first epoch to {losses[-1]:.3g} in the last (needs a fall of at least "
            f"{1 - MIN_LOSS_DROP:.0%})"
        )
    chance = _chance_accuracy(trace)
    evals = trace.evals()
    test = evals.filter(pl.col("split") == "test") if evals.height else evals
    if chance is not None and test.height:
        accuracy = float(test.sort("step")["accuracy"][-1])
        if math.isfinite(accuracy) and accuracy < CHANCE_MULTIPLE * chance:
            return (
                f"the model did not learn: final test accuracy {accuracy:.3f} against chance "
                f"{chance:.3f}"
            )
    if data is not None:
        sizes = (int(data.easy.sum()), int(data.hard.sum()))
        if min(sizes) < MIN_DECILE:
            return (
                f"the easiest and hardest deciles need at least {MIN_DECILE} samples each "
                f"(this trace has {len(data.sample_ids)} samples)"
            )
        total = float(data.imp.sum())
        if not math.isfinite(total) or total <= 0:
            return "the trace's total importance is zero or not finite"
    return None


def _chance_accuracy(trace: Trace) -> float | None:
    if not trace.meta.get("has_outputs"):
        return None
    # The distinct targets of every visit, read a chunk of steps at a time: loading the
    # visits' target column would keep it cached for the rest of the session.
    data = trace._data
    seen: set[int] = set()
    for masks in data.chunks(_SLICE_ROWS):
        values, valid = data.read_chunk(masks, ("target",))["target"]
        seen.update(np.unique(values if valid is None else values[valid]).tolist())
    return 1.0 / len(seen) if len(seen) > 1 else None
