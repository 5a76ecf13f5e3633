"""Batch samplers for any PyTorch loop: the paper's fixed batches and online selection.

Pass one as ``DataLoader(dataset, batch_sampler=sampler)``; each yields lists of dataset
indices. Difficulty or importance comes in as a plain array (e.g. the final loss or total
importance of a reference run, read by the caller from its trace): this module never reads
traces.

The paper's (Gao & Jojic) seven strategies use fixed batches visited in the same order every
epoch. With ``scores`` sorted from low to high and ``b = ceil(n / batch_size)`` batches:

- ``rand``: one random permutation (fixed by ``seed``), cut into consecutive blocks;
- ``nlo`` / ``sio``: sorted by loss / importance, low to high, cut into consecutive blocks
  (the lowest-scoring batch first);
- ``rnlo`` / ``rsio``: the same batches in reverse order (the highest-scoring batch first);
- ``nlm`` / ``sim``: sorted, and the sample at sorted position ``i`` goes to batch ``i mod b``,
  so every batch mixes the whole range.

The loss and importance strategies differ only in which scores are passed. `OnlineBatchSampler`
is online batch selection by rank (Loshchilov & Hutter, 2016): each batch is drawn with
probabilities that fall geometrically with the rank of each sample's latest score, which the
loop reports through ``update`` (losses for the paper's baseline; importances for
importance-based selection).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "FIXED_STRATEGIES",
    "FixedBatchSampler",
    "OnlineBatchSampler",
    "fixed_batch_sampler",
    "fixed_batches",
]

FIXED_STRATEGIES = ("rand", "nlo", "rnlo", "nlm", "sio", "rsio", "sim")
_BLOCKS = {"nlo", "sio"}
_REVERSED = {"rnlo", "rsio"}
_MIXED = {"nlm", "sim"}


class FixedBatchSampler(Sampler[list[int]]):
    """Yields the same batches in the same order every epoch."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(map(int, b)) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def fixed_batches(
    strategy: str,
    ids: Sequence[int] | np.ndarray,
    batch_size: int,
    scores: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """The batches of one of the paper's seven strategies, as arrays of ids.

    Args:
        strategy: one of `FIXED_STRATEGIES` (case-insensitive).
        ids: the dataset indices to batch (e.g. ``range(len(dataset))``).
        batch_size: samples per batch; the last consecutive block may be smaller.
        scores: one score per id (final loss for nlo/rnlo/nlm, importance for
            sio/rsio/sim); ignored by ``rand``. Ties keep the order of ``ids``.
        seed: the permutation of ``rand``.

    Raises:
        ValueError: unknown strategy, bad batch size, or scores missing or misaligned.
    """
    name = strategy.lower()
    if name not in FIXED_STRATEGIES:
        msg = f"unknown strategy {strategy!r}; choose one of {', '.join(FIXED_STRATEGIES)}"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be at least 1, not {batch_size}"
        raise ValueError(msg)
    ids = np.asarray(ids, dtype=np.int64)
    if name == "rand":
        order = np.random.default_rng(seed).permutation(ids)
        return _blocks(order, batch_size)
    if scores is None:
        msg = f"strategy {strategy!r} needs one score per sample"
        raise ValueError(msg)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != ids.shape:
        msg = f"got {scores.size} scores for {ids.size} samples; pass one score per sample"
        raise ValueError(msg)
    order = ids[np.argsort(scores, kind="stable")]
    if name in _BLOCKS:
        return _blocks(order, batch_size)
    if name in _REVERSED:
        return _blocks(order, batch_size)[::-1]
    n_batches = math.ceil(len(order) / batch_size)
    return [order[i::n_batches] for i in range(n_batches)]


def _blocks(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def fixed_batch_sampler(
    strategy: str,
    ids: Sequence[int] | np.ndarray,
    batch_size: int,
    scores: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
) -> FixedBatchSampler:
    """`fixed_batches` wrapped as a sampler for ``DataLoader(batch_sampler=...)``."""
    return FixedBatchSampler(fixed_batches(strategy, ids, batch_size, scores, seed))


class OnlineBatchSampler(Sampler[list[int]]):
    """Online batch selection by rank (Loshchilov & Hutter, 2016).

    Samples are ranked by their latest score, highest first (rank 0). A batch draws
    ``batch_size`` distinct samples with probability proportional to
    ``exp(-log(selection_pressure) * rank / n)``, so the top-ranked sample is
    ``selection_pressure`` times likelier than the last. Samples not yet scored rank first
    (score +inf), so every sample is seen early. An epoch is ``ceil(n / batch_size)`` batches.

    Args:
        ids: the dataset indices to draw from.
        batch_size: samples per batch.
        selection_pressure: ratio of the highest to the lowest selection probability (> 1).
        seed: the generator of the draws.
    """

    def __init__(
        self,
        ids: Sequence[int] | np.ndarray,
        batch_size: int,
        selection_pressure: float = 100.0,
        seed: int = 0,
    ) -> None:
        if selection_pressure <= 1:
            msg = f"selection_pressure must exceed 1, not {selection_pressure}"
            raise ValueError(msg)
        self.ids = np.asarray(ids, dtype=np.int64)
        if batch_size < 1 or batch_size > len(self.ids):
            msg = f"batch_size must be in [1, {len(self.ids)}], not {batch_size}"
            raise ValueError(msg)
        self.batch_size = batch_size
        self.selection_pressure = float(selection_pressure)
        self.scores = np.full(len(self.ids), np.inf)
        self._position = {int(i): p for p, i in enumerate(self.ids)}
        self._rng = np.random.default_rng(seed)

    def update(self, ids: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> None:
        """Record the latest score (e.g. loss) of each of ``ids``."""
        for sid, value in zip(np.asarray(ids).tolist(), np.asarray(scores).tolist(), strict=True):
            self.scores[self._position[int(sid)]] = value

    def probabilities(self) -> np.ndarray:
        """Each sample's current selection probability, in the order of ``ids``."""
        n = len(self.ids)
        # Random tie-breaking: unscored samples (all +inf) are drawn uniformly among themselves.
        jitter = self._rng.random(n)
        order = np.lexsort((jitter, -self.scores))
        rank = np.empty(n, dtype=np.float64)
        rank[order] = np.arange(n)
        weights = np.exp(-math.log(self.selection_pressure) * rank / n)
        return weights / weights.sum()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            chosen = self._rng.choice(
                len(self.ids), size=self.batch_size, replace=False, p=self.probabilities()
            )
            yield self.ids[chosen].tolist()

    def __len__(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)
