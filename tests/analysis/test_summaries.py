"""`epoch_summaries` on the tiny hand-computed trace (tests/analysis/tracefiles.py).

Importance = (lr·s)² · grad_sq with lr·s = 0.25 in epoch 0 and 0.125 in epoch 1, so
(lr·s)² = 1/16 then 1/64. Epoch 0 visits (sample: enc, head grad_sq): 0: 4,0; 1: 1,1;
2: 0,4; 3: 2,7. Epoch 1: 3: 8,0; 0: 0,0; 1: 4,4; 2: 16,0.
Final losses: 0 → 1.5, 1 → 0.2, 2 → 0.1, 3 → 2.5, so difficulty ranks 2, 1, 0, 3 and
deciles (rank·10 // 4) 5, 2, 0, 7.
"""

from __future__ import annotations

import polars as pl
import pytest

from samplescope.analysis import QueryError, Trace
from samplescope.analysis.summaries import TOP_SCORES, epoch_summaries


def test_importance_per_epoch_and_layer(tiny: Trace) -> None:
    got = epoch_summaries(tiny).importance
    assert got.select("epoch", "layer", "n_visits").rows() == [
        (0, "enc", 4),
        (0, "head", 4),
        (1, "enc", 4),
        (1, "head", 4),
    ]
    expected = [7 / 16, 12 / 16, 28 / 64, 4 / 64]
    assert got["importance"].to_list() == pytest.approx(expected, rel=1e-12)
    assert got["importance_mean"].to_list() == pytest.approx([x / 4 for x in expected], rel=1e-12)


def test_decile_shares(tiny: Trace) -> None:
    got = epoch_summaries(tiny).decile_share
    share = {(r["epoch"], r["layer"], r["decile"]): r["share"] for r in got.iter_rows(named=True)}
    # Epoch 0, enc: samples 0 (d5) 4, 1 (d2) 1, 2 (d0) 0, 3 (d7) 2 of a total 7.
    assert share[0, "enc", 5] == pytest.approx(4 / 7)
    assert share[0, "enc", 2] == pytest.approx(1 / 7)
    assert share[0, "enc", 0] == 0.0
    assert share[0, "enc", 7] == pytest.approx(2 / 7)
    # Epoch 1, head: only sample 1 (d2) has gradient there.
    assert share[1, "head", 2] == pytest.approx(1.0)
    assert share[1, "head", 7] == 0.0
    sums = got.group_by("epoch", "layer").agg(pl.col("share").sum())["share"]
    assert sums.to_list() == pytest.approx([1.0] * 4)


def test_decile_shares_match_samples_view(tiny: Trace) -> None:
    # Independent route: per-visit importance joined to the samples view in Polars.
    deciles = tiny.samples().select("sample_id", "difficulty_decile")
    cells = (
        tiny.table("importance")
        .collect()
        .join(deciles, on="sample_id")
        .group_by("epoch", "layer", "difficulty_decile")
        .agg(pl.col("importance").sum())
        .with_columns(
            share=pl.col("importance") / pl.col("importance").sum().over("epoch", "layer")
        )
        .sort("epoch", "layer", "difficulty_decile")
    )
    got = epoch_summaries(tiny).decile_share.sort("epoch", "layer", "decile")
    assert got["share"].to_list() == pytest.approx(cells["share"].to_list())


def test_top_tables(tiny: Trace) -> None:
    top = epoch_summaries(tiny, top_k=2).top
    importance = top.filter(pl.col("score") == "importance")
    # Sample totals: 0: 4/16, 1: 2/16 + 8/64, 2: 4/16 + 16/64, 3: 9/16 + 8/64.
    assert importance.select("rank", "sample_id", "target").rows() == [(0, 3, 1), (1, 2, 0)]
    assert importance["value"].to_list() == pytest.approx([11 / 16, 8 / 16])
    aum = top.filter(pl.col("score") == "aum")  # ascending: lowest margin first
    assert aum["sample_id"].to_list() == [3, 0]
    # el2n was not recorded by the tiny trace: no table rather than a table of NULLs.
    assert set(top["score"]) == {s for s, _ in TOP_SCORES} - {"el2n"}
    assert top.group_by("score").len()["len"].to_list() == [2] * 5


def test_top_k_must_be_positive(tiny: Trace) -> None:
    with pytest.raises(QueryError, match="top_k must be at least 1"):
        epoch_summaries(tiny, top_k=0)
