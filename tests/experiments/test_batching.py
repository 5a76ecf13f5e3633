"""The paper's seven fixed-batch strategies and online selection, against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from samplescope.experiments.samplers import (
    FIXED_STRATEGIES,
    OnlineBatchSampler,
    fixed_batch_sampler,
    fixed_batches,
)

sizes = st.tuples(st.integers(1, 60), st.integers(1, 12))


def _scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n).astype(float)


@settings(max_examples=40, deadline=None)
@given(sizes, st.sampled_from(FIXED_STRATEGIES), st.integers(0, 5))
def test_every_strategy_is_a_partition(size: tuple[int, int], strategy: str, seed: int) -> None:
    n, batch = size
    batches = fixed_batches(strategy, np.arange(n), batch, _scores(n, seed), seed=seed)
    assert len(batches) == math.ceil(n / batch)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert max(len(b) for b in batches) <= batch


@settings(max_examples=40, deadline=None)
@given(sizes, st.integers(0, 5))
def test_nlo_rnlo_nlm_definitions(size: tuple[int, int], seed: int) -> None:
    n, batch = size
    ids = np.arange(100, 100 + n)  # ids differ from positions
    scores = _scores(n, seed)
    order = ids[np.argsort(scores)]
    nlo = fixed_batches("nlo", ids, batch, scores)
    assert np.concatenate(nlo).tolist() == order.tolist()  # consecutive blocks, low to high
    rnlo = fixed_batches("rnlo", ids, batch, scores)
    assert [b.tolist() for b in rnlo] == [b.tolist() for b in nlo[::-1]]
    nlm = fixed_batches("nlm", ids, batch, scores)
    b = math.ceil(n / batch)
    for position, sid in enumerate(order):
        assert sid in nlm[position % b]
    # The importance strategies are the same constructions.
    for loss_name, imp_name in (("nlo", "sio"), ("rnlo", "rsio"), ("nlm", "sim")):
        same = fixed_batches(imp_name, ids, batch, scores)
        assert [x.tolist() for x in same] == [
            x.tolist() for x in fixed_batches(loss_name, ids, batch, scores)
        ]


def test_hand_example() -> None:
    scores = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]  # sorted ids: 1 5 3 0 4 2
    assert [b.tolist() for b in fixed_batches("nlo", range(6), 2, scores)] == [
        [1, 5],
        [3, 0],
        [4, 2],
    ]
    assert [b.tolist() for b in fixed_batches("rsio", range(6), 2, scores)] == [
        [4, 2],
        [3, 0],
        [1, 5],
    ]
    assert [b.tolist() for b in fixed_batches("nlm", range(6), 2, scores)] == [
        [1, 0],
        [5, 4],
        [3, 2],
    ]


def test_fixed_sampler_repeats_each_epoch_in_a_dataloader() -> None:
    data = TensorDataset(torch.arange(10.0))
    sampler = fixed_batch_sampler("rand", range(10), 3, seed=1)
    loader = DataLoader(data, batch_sampler=sampler)
    first = [b[0].tolist() for b in loader]
    assert first == [b[0].tolist() for b in loader]
    assert len(first) == 4
    assert sorted(i for b in first for i in b) == list(range(10))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        fixed_batches("best", range(4), 2, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="needs one score"):
        fixed_batches("nlo", range(4), 2)
    with pytest.raises(ValueError, match="one score per sample"):
        fixed_batches("sim", range(4), 2, [0, 1])
    with pytest.raises(ValueError, match="selection_pressure"):
        OnlineBatchSampler(range(4), 2, selection_pressure=1.0)


def test_online_probabilities_fall_geometrically_with_rank() -> None:
    n = 8
    sampler = OnlineBatchSampler(range(n), 2, selection_pressure=100.0, seed=0)
    sampler.update(range(n), np.arange(n, dtype=float))  # sample 7 has the highest loss
    p = sampler.probabilities()
    assert np.argmax(p) == 7
    assert np.all(np.diff(p) > 0)
    ratio = p[7] / p[0]
    assert ratio == pytest.approx(math.exp(math.log(100.0) * (n - 1) / n))
    assert p.sum() == pytest.approx(1.0)


def test_online_batches_are_distinct_and_prefer_high_loss() -> None:
    n = 50
    sampler = OnlineBatchSampler(range(n), 5, selection_pressure=1000.0, seed=0)
    sampler.update(range(n), np.arange(n, dtype=float))
    drawn = [i for batch in sampler for i in batch]
    assert len(list(sampler)) == 10
    assert all(len(set(b)) == 5 for b in sampler)
    assert np.mean(drawn) > 30  # uniform would average 24.5
