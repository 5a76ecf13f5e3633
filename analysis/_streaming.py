"""`samples` computed chunk by chunk: per-sample sums in numpy arrays, bounded memory.

`scores.sample_scores` holds every visit of the trace at once (3M visits × ~20 derived
columns for a 60k × 50-epoch run: over a gigabyte). Here the visits are read one chunk of
steps at a time (each chunk within one epoch, in step order) and folded into per-sample
accumulators — sums, counts, the last visit's values, the correct/incorrect state for
forgetting events, and per-epoch means for cartography — so memory grows with the number of
samples, not of visits. The definitions are those of `scores` (docs/analysis.md); the
results agree with the Polars path up to floating-point summation order.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from samplescope.analysis._hdf5 import TraceData

__all__ = ["SCORE_COLUMNS", "stream_sample_scores"]

_CHUNK_ROWS = 1 << 18
# The visit columns per-sample scores are computed from (both the streaming and in-memory
# paths read exactly these).
SCORE_COLUMNS = (
    "sample_id",
    "loss",
    "target",
    "correct",
    "p_target",
    "margin",
    "el2n",
    "input_sq",
    "input_grad_sq",
    "lr_scale",
    "grad_sq",
    "duplicate",  # DistributedSampler padding repeats: left out of every score
)
_MEANS = ("aum", "aum_after_first", "el2n", "el2n_proxy", "grand", "input_sq", "input_grad_sq")


def _sample_ids(data: TraceData) -> np.ndarray:
    """The sorted distinct sample ids, read one shard's column at a time."""
    found = np.zeros(0, dtype=np.int64)
    for steps in data.steps:
        for start, stop, _ in steps.ranges(None):
            ids = np.asarray(steps.shard.read("visits", "sample_id", start, stop))
            found = np.union1d(found, _distinct(ids))
    return found


def _distinct(ids: np.ndarray) -> np.ndarray:
    if len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + 1024:
        # Dense non-negative ids (the usual dataset indices): a bitmap beats sorting.
        seen = np.zeros(int(ids.max()) + 1, dtype=bool)
        seen[ids] = True
        return np.flatnonzero(seen)
    return np.unique(ids)


class _Accumulator:
    """Per-sample running sums over visits fed in step order."""

    def __init__(self, ids: np.ndarray, n_layers: int, early: set[int], first: int) -> None:
        n = len(ids)
        self.ids, self.n_layers, self.early, self.first = ids, n_layers, early, first
        zeros = lambda dtype=np.float64: np.zeros(n, dtype=dtype)  # noqa: E731
        self.n_visits = zeros(np.int64)
        self.importance, self.when_num, self.tracin = zeros(), zeros(), zeros()
        self.layer = [zeros() for _ in range(n_layers)]
        self.sums = {name: zeros() for name in _MEANS}
        self.counts = {name: zeros(np.int64) for name in _MEANS}
        self.target, self.target_valid = zeros(np.int64), zeros(bool)
        self.final_loss = zeros()
        self.state = np.full(n, -1, dtype=np.int8)  # last visit's correct: 1, 0, -1 = NULL
        self.has_correct, self.forgetting = zeros(bool), zeros(np.int64)
        self.learned = zeros(bool)  # correct at some visit
        # Cartography: the current epoch's sums, then Σ and Welford moments over epochs.
        self.epoch_sums = {k: zeros() for k in ("p", "p_n", "c", "c_n")}
        self.conf_sum, self.p_epochs, self.p_mean, self.p_m2 = zeros(), zeros(), zeros(), zeros()
        self.c_sum, self.c_epochs = zeros(), zeros()

    def _index(self, sample_id: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, sample_id)

    def _sum(self, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(idx, weights=weights, minlength=len(self.ids))

    def add(self, epoch: int, cols: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        idx = self._index(cols["sample_id"][0])
        if len(idx) == 0:
            return
        counts = np.bincount(idx, minlength=len(self.ids))
        self.n_visits += counts
        grad = cols["grad_sq"][0].astype(np.float64)
        lr_scale = cols["lr_scale"][0]
        scale_sq = lr_scale * lr_scale
        per_layer = [scale_sq * grad[:, layer] for layer in range(self.n_layers)]
        total_imp, grad_total = per_layer[0], grad[:, 0]
        for layer in range(1, self.n_layers):  # left to right, as pl.sum_horizontal
            total_imp, grad_total = total_imp + per_layer[layer], grad_total + grad[:, layer]
        for layer, values in enumerate(per_layer):
            self.layer[layer] += self._sum(idx, values)
        self.importance += self._sum(idx, total_imp)
        self.when_num += self._sum(idx, epoch * total_imp)
        self.tracin += self._sum(idx, lr_scale * grad_total)
        early = epoch in self.early
        self._mean("aum", idx, cols["margin"])
        if epoch != self.first:
            self._mean("aum_after_first", idx, cols["margin"])
        self._mean("input_sq", idx, cols["input_sq"])
        self._mean("input_grad_sq", idx, cols["input_grad_sq"])
        if early:
            p_values, p_valid = cols["p_target"]
            self._mean("el2n_proxy", idx, (1.0 - p_values.astype(np.float64), p_valid))
            self._mean("el2n", idx, cols["el2n"])
            self._mean("grand", idx, (np.sqrt(grad_total), None))
        self._cartography(idx, cols)
        self._last_and_forgetting(idx, counts, cols)

    def _mean(
        self, name: str, idx: np.ndarray, column: tuple[np.ndarray, np.ndarray | None]
    ) -> None:
        values, valid = column
        values = values.astype(np.float64)
        if valid is not None:
            idx, values = idx[valid], values[valid]
        self.sums[name] += self._sum(idx, values)
        self.counts[name] += np.bincount(idx, minlength=len(self.ids))

    def _cartography(
        self, idx: np.ndarray, cols: dict[str, tuple[np.ndarray, np.ndarray | None]]
    ) -> None:
        p, p_valid = cols["p_target"]
        p_idx = idx if p_valid is None else idx[p_valid]
        p = (p if p_valid is None else p[p_valid]).astype(np.float64)
        self.epoch_sums["p"] += self._sum(p_idx, p)
        self.epoch_sums["p_n"] += np.bincount(p_idx, minlength=len(self.ids))
        correct = cols["correct"][0]
        known = correct >= 0
        self.epoch_sums["c"] += self._sum(idx[known], correct[known].astype(np.float64))
        self.epoch_sums["c_n"] += np.bincount(idx[known], minlength=len(self.ids))

    def end_epoch(self) -> None:
        """Fold the finished epoch's per-sample means into the cartography moments."""
        sums = self.epoch_sums
        has_p = sums["p_n"] > 0
        p = sums["p"][has_p] / sums["p_n"][has_p]
        self.conf_sum[has_p] += p
        self.p_epochs[has_p] += 1
        delta = p - self.p_mean[has_p]
        self.p_mean[has_p] += delta / self.p_epochs[has_p]
        self.p_m2[has_p] += delta * (p - self.p_mean[has_p])
        has_c = sums["c_n"] > 0
        self.c_sum[has_c] += sums["c"][has_c] / sums["c_n"][has_c]
        self.c_epochs[has_c] += 1
        for values in sums.values():
            values.fill(0)

    def _last_and_forgetting(
        self,
        idx: np.ndarray,
        counts: np.ndarray,
        cols: dict[str, tuple[np.ndarray, np.ndarray | None]],
    ) -> None:
        correct = cols["correct"][0]
        if counts.max() <= 1:
            order, last = np.arange(len(idx)), np.ones(len(idx), dtype=bool)
            first = last
        else:  # a sample visited twice in the chunk: group its visits, keep step order
            order = np.argsort(idx, kind="stable")
            grouped = idx[order]
            last = np.r_[grouped[1:] != grouped[:-1], True]
            first = np.r_[True, grouped[1:] != grouped[:-1]]
        sidx, cur = idx[order], correct[order]
        prev = np.r_[np.int8(-1), cur[:-1]]
        prev[first] = self.state[sidx[first]]
        events = (prev == 1) & (cur == 0)
        self.forgetting += np.bincount(sidx[events], minlength=len(self.ids))
        self.has_correct[sidx[cur >= 0]] = True
        self.learned[sidx[cur == 1]] = True
        rows, where = order[last], sidx[last]
        self.state[where] = cur[last]
        self.final_loss[where] = cols["loss"][0][rows].astype(np.float64)
        target, valid = cols["target"]
        self.target[where] = target[rows]
        self.target_valid[where] = True if valid is None else valid[rows]

    def frame(self) -> pl.DataFrame:
        """The per-sample aggregates, named as `scores.sample_scores` expects."""

        def mean(name: str) -> pl.Series:
            n = self.counts[name]
            values = np.divide(self.sums[name], n, out=np.zeros(len(n)), where=n > 0)
            return _masked(name, values, n > 0, pl.Float64)

        outputs = self.has_correct
        p_n, c_n = self.p_epochs, self.c_epochs
        confidence = np.divide(self.conf_sum, p_n, out=np.zeros(len(p_n)), where=p_n > 0)
        variability = np.sqrt(np.divide(self.p_m2, p_n, out=np.zeros(len(p_n)), where=p_n > 0))
        correctness = np.divide(self.c_sum, c_n, out=np.zeros(len(c_n)), where=c_n > 0)
        return pl.DataFrame(
            {
                "sample_id": self.ids.astype(np.int64),
                "n_visits": self.n_visits,
                "target": _masked("target", self.target, self.target_valid, pl.Int64),
                "importance": self.importance,
                **{f"importance_{layer}": values for layer, values in enumerate(self.layer)},
                "_when_num": self.when_num,
                "final_loss": self.final_loss,
                "final_correct": _masked(
                    "final_correct", self.state == 1, self.state >= 0, pl.Boolean
                ),
                # Never learned: the maximum count, as in `scores` (Toneva et al.).
                "forgetting_events": _masked(
                    "forgetting_events",
                    np.where(self.learned, self.forgetting, self.n_visits),
                    outputs,
                    pl.Int64,
                ),
                **{name: mean(name) for name in _MEANS},
                "tracin_self": self.tracin,
                "confidence": _masked("confidence", confidence, p_n > 0, pl.Float64),
                "variability": _masked("variability", variability, p_n > 0, pl.Float64),
                "correctness": _masked("correctness", correctness, c_n > 0, pl.Float64),
            }
        )


def _masked(
    name: str,
    values: np.ndarray,
    valid: np.ndarray,
    dtype: pl.DataType,
) -> pl.Series:
    series = pl.Series(name, values, dtype=dtype)
    missing = np.flatnonzero(~valid)
    return series.scatter(missing, None) if len(missing) else series


def _without_duplicates(
    cols: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The chunk without the visits flagged ``duplicate`` (see `_duplicates.py`)."""
    duplicate = cols.pop("duplicate")[0]
    if not duplicate.any():
        return cols
    keep = ~duplicate
    return {k: (v[keep], None if ok is None else ok[keep]) for k, (v, ok) in cols.items()}


def stream_sample_scores(data: TraceData, early_epochs: int) -> pl.DataFrame | None:
    """Per-sample aggregates of every visit, read chunk by chunk.

    Args:
        data: the open trace's HDF5 side.
        early_epochs: how many of the first recorded epochs form the "early" window.

    Returns:
        The frame `scores.finish_sample_scores` takes, or None when the trace's epochs are
        not in step order (the caller then uses the in-memory path).
    """
    chunks = data.epoch_chunks(_CHUNK_ROWS)
    if chunks is None:
        return None
    visited = np.unique(np.concatenate([s.epoch[s.batch_size > 0] for s in data.steps]))
    early = {int(e) for e in visited[: max(early_epochs, 1)]}
    first = int(visited[0]) if len(visited) else 0
    acc = _Accumulator(_sample_ids(data), data.n_layers, early, first)
    current: int | None = None
    for epoch, masks in chunks:
        if current is not None and epoch != current:
            acc.end_epoch()
        current = epoch
        acc.add(epoch, _without_duplicates(data.read_chunk(masks, SCORE_COLUMNS)))
    acc.end_epoch()
    return acc.frame()
