"""The one engine behind every per-sample and per-(sample, epoch) table.

The visits are read one chunk of steps at a time, in step order (`TraceData.chunks`), and
folded into numpy accumulators: per sample — sums, counts, the last visit's values, the
correct/incorrect state for forgetting events, the importance of the first and last
`PERIOD_FRACTION` of the steps — and per (sample, epoch) — visits, loss, importance and
grad_sq per layer, and the means cartography takes. Memory grows with the samples (and the
(sample, epoch) rollup, one row per sample and epoch visited), never with the visits.

The definitions are those written in docs/analysis.md; tests/analysis/test_engine_pins.py
checks them against the in-memory Polars reading they replaced. Importance is
`importance.per_visit`, the one definition every path uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from samplescope.analysis._hdf5 import TraceData
from samplescope.analysis._importance import per_visit

__all__ = ["SCORE_COLUMNS", "Streamed", "sample_ids", "stream"]

_CHUNK_ROWS = 1 << 18
# The visit columns the engine reads.
SCORE_COLUMNS = (
    "epoch",
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
# The (sample, epoch) sums kept for cartography until an epoch's means are final.
_CARTOGRAPHY = ("p", "p_n", "c", "c_n")
Columns = dict[str, tuple[np.ndarray, np.ndarray | None]]


@dataclass
class Streamed:
    """What one pass over the visits gives.

    Attributes:
        per_sample: one row per sample, the aggregates `scores.finish_sample_scores` takes.
        rollup: one row per (sample, epoch) visited, sorted by epoch then sample_id:
            sample_id, epoch, n_visits, loss (mean of the visits' losses),
            importance_<l> and grad_sq_<l> (sums over the visits).
        period: [samples, layers, 2] importance in the first and the last `period_fraction`
            of the recorded steps (rows in sample_id order).
    """

    per_sample: pl.DataFrame
    rollup: pl.DataFrame | None
    period: np.ndarray | None


def sample_ids(data: TraceData) -> np.ndarray:
    """The sorted distinct sample ids, read one shard's column at a time."""
    found = np.zeros(0, dtype=np.int64)
    for steps in data.steps:
        for start, stop, _ in steps.ranges(None):
            ids = np.asarray(steps.shard.read("visits", "sample_id", start, stop))
            found = np.union1d(found, _distinct(ids))
    return found.astype(np.int64)


def _distinct(ids: np.ndarray) -> np.ndarray:
    if len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + 1024:
        # Dense non-negative ids (the usual dataset indices): a bitmap beats sorting.
        seen = np.zeros(int(ids.max()) + 1, dtype=bool)
        seen[ids] = True
        return np.flatnonzero(seen)
    return np.unique(ids)


def _rows(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    return np.ones(len(values), dtype=bool) if valid is None else valid


class _Epoch:
    """Dense per-sample sums of one epoch while its visits arrive (the rollup's columns
    only when `rollup`; cartography's always)."""

    def __init__(self, n: int, n_layers: int, *, rollup: bool) -> None:
        self.n_visits = np.zeros(n, dtype=np.int64)
        self.rollup = rollup
        width = n if rollup else 0
        self.loss = np.zeros(width)
        self.importance = np.zeros((n_layers, width))
        self.grad_sq = np.zeros((n_layers, width))
        self.cartography = {k: np.zeros(n) for k in _CARTOGRAPHY}

    def block(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The visited samples' rows (sample_id order)."""
        rows = np.flatnonzero(self.n_visits)
        block = {
            "sample_id": ids[rows],
            "epoch": np.full(len(rows), epoch, dtype=np.int64),
            "n_visits": self.n_visits[rows],
            **{k: v[rows] for k, v in self.cartography.items()},
        }
        if self.rollup:
            block.update(
                loss=self.loss[rows],
                importance=self.importance[:, rows],
                grad_sq=self.grad_sq[:, rows],
            )
        return block


class _Accumulator:
    """Per-sample running sums over visits fed in step order."""

    def __init__(
        self,
        ids: np.ndarray,
        n_layers: int,
        early: set[int],
        first: int,
        period_steps: tuple[int, int] | None,
    ) -> None:
        n = len(ids)
        self.ids, self.n_layers, self.early, self.first = ids, n_layers, early, first
        self.period_steps = period_steps
        zeros = lambda dtype=np.float64: np.zeros(n, dtype=dtype)  # noqa: E731
        self.n_visits = zeros(np.int64)
        self.importance, self.when_num, self.tracin = zeros(), zeros(), zeros()
        self.layer = [zeros() for _ in range(n_layers)]
        self.period = np.zeros((n if period_steps is not None else 0, n_layers, 2))
        self.sums = {name: zeros() for name in _MEANS}
        self.counts = {name: zeros(np.int64) for name in _MEANS}
        self.target, self.target_valid = zeros(np.int64), zeros(bool)
        self.final_loss = zeros()
        self.state = np.full(n, -1, dtype=np.int8)  # last visit's correct: 1, 0, -1 = NULL
        self.has_correct, self.forgetting = zeros(bool), zeros(np.int64)
        self.learned = zeros(bool)  # correct at some visit
        # Cartography: Σ and Welford moments over epochs of each epoch's mean.
        self.conf_sum, self.p_epochs, self.p_mean, self.p_m2 = zeros(), zeros(), zeros(), zeros()
        self.c_sum, self.c_epochs = zeros(), zeros()
        self.open: dict[int, _Epoch] = {}

    def _sum(self, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(idx, weights=weights, minlength=len(self.ids))

    def add(self, step: np.ndarray, cols: Columns) -> None:
        """Fold one chunk (rows in step order)."""
        idx = np.searchsorted(self.ids, cols["sample_id"][0])
        if len(idx) == 0:
            return
        self.n_visits += np.bincount(idx, minlength=len(self.ids))
        grad = cols["grad_sq"][0].astype(np.float64)
        lr_scale = cols["lr_scale"][0]
        per_layer = per_visit(lr_scale, grad)
        total_imp, grad_total = per_layer[:, 0], grad[:, 0]
        for layer in range(1, self.n_layers):  # left to right, as the tables have always summed
            total_imp, grad_total = total_imp + per_layer[:, layer], grad_total + grad[:, layer]
        epoch = cols["epoch"][0]
        for layer in range(self.n_layers):
            self.layer[layer] += self._sum(idx, per_layer[:, layer])
        self.importance += self._sum(idx, total_imp)
        self.when_num += self._sum(idx, epoch * total_imp)
        self.tracin += self._sum(idx, lr_scale * grad_total)
        if self.period_steps is not None:
            lo, hi = self.period_steps
            for which, rows in enumerate((step < lo, step >= hi)):
                if rows.any():
                    for layer in range(self.n_layers):
                        self.period[:, layer, which] += self._sum(idx[rows], per_layer[rows, layer])
        early = np.isin(epoch, list(self.early))
        self._mean("aum", idx, cols["margin"])
        self._mean("aum_after_first", idx, cols["margin"], epoch != self.first)
        self._mean("input_sq", idx, cols["input_sq"])
        self._mean("input_grad_sq", idx, cols["input_grad_sq"])
        p_values, p_valid = cols["p_target"]
        self._mean("el2n_proxy", idx, (1.0 - p_values.astype(np.float64), p_valid), early)
        self._mean("el2n", idx, cols["el2n"], early)
        self._mean("grand", idx, (np.sqrt(grad_total), None), early)
        if epoch[0] == epoch[-1] and (epoch == epoch[0]).all():  # the usual chunk: one epoch
            self._epoch_sums(int(epoch[0]), idx, per_layer, grad, cols, slice(None))
        else:
            for value in np.unique(epoch):
                rows = epoch == value
                self._epoch_sums(int(value), idx[rows], per_layer[rows], grad[rows], cols, rows)
        self._last_and_forgetting(idx, cols)

    def _mean(
        self,
        name: str,
        idx: np.ndarray,
        column: tuple[np.ndarray, np.ndarray | None],
        keep: np.ndarray | bool = True,
    ) -> None:
        values, valid = column
        rows = _rows(values, valid) & keep
        idx, values = idx[rows], values[rows].astype(np.float64)
        self.sums[name] += self._sum(idx, values)
        self.counts[name] += np.bincount(idx, minlength=len(self.ids))

    def _epoch_sums(
        self,
        epoch: int,
        idx: np.ndarray,
        per_layer: np.ndarray,
        grad: np.ndarray,
        cols: Columns,
        rows: np.ndarray | slice,
    ) -> None:
        acc = self.open.get(epoch)
        if acc is None:
            rollup = self.period_steps is not None
            acc = self.open[epoch] = _Epoch(len(self.ids), self.n_layers, rollup=rollup)
        acc.n_visits += np.bincount(idx, minlength=len(self.ids))
        if acc.rollup:
            acc.loss += self._sum(idx, cols["loss"][0][rows].astype(np.float64))
            for layer in range(self.n_layers):
                acc.importance[layer] += self._sum(idx, per_layer[:, layer])
                acc.grad_sq[layer] += self._sum(idx, grad[:, layer])
        p, p_valid = cols["p_target"]
        keep = _rows(p, p_valid)[rows]
        acc.cartography["p"] += self._sum(idx[keep], p[rows][keep].astype(np.float64))
        acc.cartography["p_n"] += np.bincount(idx[keep], minlength=len(self.ids))
        correct, c_valid = cols["correct"]
        keep = _rows(correct, c_valid)[rows]
        acc.cartography["c"] += self._sum(idx[keep], correct[rows][keep].astype(np.float64))
        acc.cartography["c_n"] += np.bincount(idx[keep], minlength=len(self.ids))

    def fold_cartography(self, block: dict[str, np.ndarray]) -> None:
        """Fold one epoch's final per-sample means into the cartography moments."""
        where = np.searchsorted(self.ids, block["sample_id"])
        has_p = block["p_n"] > 0
        at, p = where[has_p], block["p"][has_p] / block["p_n"][has_p]
        self.conf_sum[at] += p
        self.p_epochs[at] += 1
        delta = p - self.p_mean[at]
        self.p_mean[at] += delta / self.p_epochs[at]
        self.p_m2[at] += delta * (p - self.p_mean[at])
        has_c = block["c_n"] > 0
        at = where[has_c]
        self.c_sum[at] += block["c"][has_c] / block["c_n"][has_c]
        self.c_epochs[at] += 1

    def _last_and_forgetting(self, idx: np.ndarray, cols: Columns) -> None:
        values, valid = cols["correct"]
        correct = np.where(_rows(values, valid), values.astype(np.int8), np.int8(-1))
        order = np.argsort(idx, kind="stable")  # group each sample's visits, keep step order
        grouped = idx[order]
        last = np.r_[grouped[1:] != grouped[:-1], True]
        first = np.r_[True, grouped[1:] != grouped[:-1]]
        cur = correct[order]
        prev = np.r_[np.int8(-1), cur[:-1]]
        prev[first] = self.state[grouped[first]]
        events = (prev == 1) & (cur == 0)
        self.forgetting += np.bincount(grouped[events], minlength=len(self.ids))
        self.has_correct[grouped[cur >= 0]] = True
        self.learned[grouped[cur == 1]] = True
        rows, where = order[last], grouped[last]
        self.state[where] = cur[last]
        self.final_loss[where] = cols["loss"][0][rows].astype(np.float64)
        target, t_valid = cols["target"]
        self.target[where] = target[rows]
        self.target_valid[where] = _rows(target, t_valid)[rows]

    def frame(self) -> pl.DataFrame:
        """The per-sample aggregates, named as `scores.finish_sample_scores` expects."""

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
                # Never learned: the maximum count, their number of visits (Toneva et al.).
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


def _masked(name: str, values: np.ndarray, valid: np.ndarray, dtype: pl.DataType) -> pl.Series:
    series = pl.Series(name, values, dtype=dtype)
    missing = np.flatnonzero(~valid)
    return series.scatter(missing, None) if len(missing) else series


def _without_duplicates(cols: Columns) -> Columns:
    """The chunk without the visits flagged ``duplicate`` (see `_duplicates.py`)."""
    duplicate = cols.pop("duplicate")[0]
    if not duplicate.any():
        return cols
    keep = ~duplicate
    return {k: (v[keep], None if ok is None else ok[keep]) for k, (v, ok) in cols.items()}


def _merge(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blocks of the same epoch (the epoch came back later in step order) as one."""
    if len(blocks) == 1:
        return blocks[0]
    ids = np.concatenate([b["sample_id"] for b in blocks])
    unique, inverse = np.unique(ids, return_inverse=True)

    def add(key: str) -> np.ndarray:
        values = np.concatenate([b[key] for b in blocks], axis=-1)
        if values.ndim == 2:
            return np.stack([np.bincount(inverse, v, minlength=len(unique)) for v in values])
        out = np.bincount(inverse, values, minlength=len(unique))
        return out.astype(values.dtype) if values.dtype.kind == "i" else out

    merged = {k: add(k) for k in blocks[0] if k not in ("sample_id", "epoch")}
    merged["sample_id"] = unique
    merged["epoch"] = np.full(len(unique), blocks[0]["epoch"][0], dtype=np.int64)
    return merged


def _frame(block: dict[str, np.ndarray], n_layers: int) -> pl.DataFrame:
    """One epoch's rollup rows as a frame (its arrays handed over, not kept twice)."""
    return pl.DataFrame(
        {
            "sample_id": block["sample_id"].astype(np.int64, copy=False),
            "epoch": block["epoch"],
            "n_visits": block["n_visits"].astype(np.int64, copy=False),
            "loss": block["loss"] / block["n_visits"],
            **{f"importance_{layer}": block["importance"][layer] for layer in range(n_layers)},
            **{f"grad_sq_{layer}": block["grad_sq"][layer] for layer in range(n_layers)},
        }
    )


def _rollup(frames: list[pl.DataFrame], n_layers: int) -> pl.DataFrame:
    if frames:
        # Chunked, not rechunked: one copy of the rows at any time.
        return pl.concat(frames, rechunk=False)
    schema: dict[str, pl.DataType] = {
        "sample_id": pl.Int64(),
        "epoch": pl.Int64(),
        "n_visits": pl.Int64(),
        "loss": pl.Float64(),
    }
    schema.update({f"importance_{layer}": pl.Float64() for layer in range(n_layers)})
    schema.update({f"grad_sq_{layer}": pl.Float64() for layer in range(n_layers)})
    return pl.DataFrame(schema=schema)


def stream(data: TraceData, early_epochs: int, period_fraction: float | None = None) -> Streamed:
    """Fold every visit of `data` into per-sample and per-(sample, epoch) tables.

    Args:
        data: the open trace's HDF5 side (with visits and layers).
        early_epochs: how many of the first recorded epochs form the "early" window.
        period_fraction: the share of the recorded steps in each of the first and last
            periods of `Streamed.period`; None for the per-sample aggregates alone (no
            rollup, no periods: `Streamed.rollup` and `.period` are then None), which is
            all `samples()` needs and holds nothing per (sample, epoch).
    """
    visited = np.unique(np.concatenate([s.epoch[s.batch_size > 0] for s in data.steps]))
    early = {int(e) for e in visited[: max(early_epochs, 1)]}
    first = int(visited[0]) if len(visited) else 0
    steps = np.unique(np.concatenate([s.step[s.batch_size > 0] for s in data.steps]))
    # A step's position p among the visited steps: first period p < f·n, last p ≥ (1 − f)·n.
    n_steps = max(len(steps), 1)
    pos = np.arange(len(steps))
    fraction = 0.0 if period_fraction is None else period_fraction
    lo_pos = int(np.sum(pos < fraction * n_steps))
    hi_pos = int(np.sum(pos < (1 - fraction) * n_steps))
    lo = int(steps[lo_pos]) if lo_pos < len(steps) else np.iinfo(np.int64).max
    hi = int(steps[hi_pos]) if hi_pos < len(steps) else np.iinfo(np.int64).max
    full = period_fraction is not None
    acc = _Accumulator(sample_ids(data), data.n_layers, early, first, (lo, hi) if full else None)
    in_order = data.epochs_in_step_order()
    blocks: dict[int, list[dict[str, np.ndarray]]] = {}
    frames: dict[int, pl.DataFrame] = {}

    def close(epoch: int) -> None:
        block = acc.open.pop(epoch).block(epoch, acc.ids)
        if in_order:  # the epoch is final: fold its means, keep only its rollup rows
            acc.fold_cartography(block)
            if full:
                frames[epoch] = _frame(block, data.n_layers)
        else:
            blocks.setdefault(epoch, []).append(block)

    for masks in data.chunks(_CHUNK_ROWS):
        cols = data.read_chunk(masks, ("step", *SCORE_COLUMNS))
        # Epochs present before the padding repeats leave, so none closes while it goes on.
        present = set(np.unique(cols["epoch"][0]).tolist())
        cols = _without_duplicates(cols)
        step = cols.pop("step")[0]
        for epoch in [e for e in acc.open if e not in present]:
            close(epoch)
        acc.add(step, cols)
    for epoch in list(acc.open):
        close(epoch)
    for epoch in sorted(blocks):  # epochs that came back later in step order: merged now
        block = _merge(blocks.pop(epoch))
        acc.fold_cartography(block)
        if full:
            frames[epoch] = _frame(block, data.n_layers)
    return Streamed(
        per_sample=acc.frame(),
        rollup=_rollup([frames[e] for e in sorted(frames)], data.n_layers) if full else None,
        period=acc.period if full else None,
    )
