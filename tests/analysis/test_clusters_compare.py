"""Clusters (k-means per class, labelled by loss speed) and compare (seed stability)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tracefiles import write_trace

from samplescope.analysis import TraceError, compare_traces, open_trace
from samplescope.analysis.clusters import difficulty_labels


def test_difficulty_labels() -> None:
    assert difficulty_labels(np.array([0.5])) == ["medium"]
    assert difficulty_labels(np.array([2.0, 1.0])) == ["hard", "easy"]
    assert difficulty_labels(np.array([3.0, 1.0, 2.0])) == ["hard", "easy", "medium"]


def _two_kinds(path: Path, *, scale_b: float = 1.0, reverse: bool = False) -> Path:
    """8 samples of one class over 3 epochs (one step of all 8 per epoch).

    Samples 0-3 are "early" (big gradients in epoch 0, loss falls fast);
    samples 4-7 are "late" (big gradients in epoch 2, loss stays high).
    """
    n, epochs = 8, 3
    sample_id = np.tile(np.arange(n), epochs)
    epoch = np.repeat(np.arange(epochs), n)
    early = sample_id < 4
    grad = np.where(early, np.array([9.0, 1.0, 0.1])[epoch], np.array([0.1, 1.0, 9.0])[epoch])
    grad = grad * (1 + 0.01 * sample_id) * np.where(sample_id < 4, 1.0, scale_b)
    if reverse:
        grad = 1.0 / grad
    loss = np.where(early, np.array([1.0, 0.2, 0.05])[epoch], np.array([1.0, 0.9, 0.8])[epoch])
    return write_trace(
        path,
        layers=["only"],
        steps={
            "step": np.arange(epochs),
            "epoch": np.arange(epochs),
            "lr": [1.0] * epochs,
            "batch_size": [n] * epochs,
        },
        visits={
            "step": epoch,
            "sample_id": sample_id,
            "loss": loss,
            "grad_sq": grad[:, None],
            "target": np.zeros(n * epochs, dtype=np.int64),
            "pred": np.zeros(n * epochs, dtype=np.int64),
            "p_target": np.full(n * epochs, 0.5),
            "margin": np.zeros(n * epochs),
        },
    )


def test_clusters_separate_and_label_by_loss_speed(tmp_path: Path) -> None:
    with open_trace(_two_kinds(tmp_path / "c.h5")) as trace:
        table = trace.clusters(k=2, seed=0)
    assert table.height == 8
    labels = table.sort("sample_id")["label"].to_list()
    assert labels == ["easy"] * 4 + ["hard"] * 4
    assert table["cluster_size"].to_list() == [4] * 8
    auc = table.group_by("label").agg(pl.col("cluster_loss_auc").first())
    got = dict(auc.iter_rows())
    assert got["easy"] == pytest.approx((1.0 + 0.2 + 0.05) / 3)
    assert got["hard"] == pytest.approx((1.0 + 0.9 + 0.8) / 3)


def test_clusters_cap_k_at_distinct_profiles(tmp_path: Path) -> None:
    with open_trace(_two_kinds(tmp_path / "c.h5")) as trace:
        table = trace.clusters(k=50)
    assert table["cluster"].n_unique() == 8


def test_compare_identical_scaled_and_reversed_runs(tmp_path: Path) -> None:
    a = _two_kinds(tmp_path / "a.h5")
    b = _two_kinds(tmp_path / "b.h5", scale_b=1.0)
    c = _two_kinds(tmp_path / "c.h5", reverse=True)
    table = compare_traces([a, b, c])
    assert table.columns == [
        "run_a",
        "run_b",
        "trace_a",
        "trace_b",
        "epoch",
        "n_samples",
        "spearman",
    ]
    ab = table.filter((pl.col("run_a") == 0) & (pl.col("run_b") == 1))
    assert ab["spearman"].to_list() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert ab["epoch"].to_list() == [0, 1, 2, None]
    ac = table.filter((pl.col("run_a") == 0) & (pl.col("run_b") == 2))
    assert ac["spearman"].to_list()[:3] == pytest.approx([-1.0, -1.0, -1.0])
    assert ac["n_samples"].to_list() == [8, 8, 8, 8]


def test_compare_needs_two(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="at least two"):
        compare_traces([_two_kinds(tmp_path / "a.h5")])
