"""Label flipping and the subsets pruning keeps, against their definitions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samplescope.experiments._common import ExperimentError
from samplescope.experiments.noise import flip_labels
from samplescope.experiments.prune import _kept, equal_step_batches


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.floats(0, 0.9), st.integers(2, 10), st.integers(0, 3))
def test_flip_labels_flips_exactly_the_fraction_to_other_classes(
    n: int, fraction: float, classes: int, seed: int
) -> None:
    targets = np.random.default_rng(seed).integers(0, classes, size=n + 5)
    ids = np.arange(5, n + 5)  # a subset: ids 0-4 are never touched
    noisy, flipped = flip_labels(targets, ids, fraction, classes, seed=seed)
    assert flipped.sum() == round(fraction * n)
    assert np.all(noisy[ids[flipped]] != targets[ids[flipped]])
    assert np.all(noisy[ids[~flipped]] == targets[ids[~flipped]])
    assert np.all(noisy[:5] == targets[:5])
    assert noisy.min() >= 0
    assert noisy.max() < classes


def test_flip_labels_rejects_bad_fraction() -> None:
    with pytest.raises(ExperimentError, match="noise fractions"):
        flip_labels(np.zeros(4, dtype=int), np.arange(4), 1.0, 10)


def test_prune_keeps_the_hardest_and_random_keeps_the_count() -> None:
    ids = np.array([10, 11, 12, 13, 14])
    scores = pl.DataFrame({"sample_id": ids, "el2n": [0.5, None, 0.9, 0.1, 0.7]})
    assert _kept(ids, scores, "el2n", 0.6, seed=0).tolist() == [10, 12, 14]
    kept = _kept(ids, scores, "random", 0.4, seed=0)
    assert len(kept) == 2
    assert set(kept) <= set(ids)


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3, 0.07])
def test_every_subset_gets_the_full_sets_sgd_steps(keep: float) -> None:
    # 1,000 samples in batches of 64: 16 steps per epoch (the last one 40 samples).
    n, batch = 1000, 64
    kept = np.sort(np.random.default_rng(1).permutation(n)[: round(keep * n)])
    batches = equal_step_batches(kept, n, batch, np.random.default_rng(0))
    epochs = [batches(e) for e in range(3)]
    assert [len(b) for b in epochs] == [16, 16, 16]
    seen = np.concatenate([np.concatenate(b) for b in epochs])
    assert set(seen.tolist()) <= set(kept.tolist())
    if keep < 1:
        assert all(len(x) == min(batch, len(kept)) for b in epochs for x in b)
        # Reshuffled passes: no kept sample is seen more than once more than another.
        counts = np.bincount(np.searchsorted(kept, seen), minlength=len(kept))
        assert counts.max() - counts.min() <= 1
    else:
        assert len(seen) == 3 * n
        assert np.all(np.bincount(seen, minlength=n) == 3)
