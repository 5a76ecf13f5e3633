"""Every per-sample statistic against values worked out by hand on the tiny trace.

The tiny trace (tracefiles.TINY_*): lr·s = 0.5/2 = 0.25 in epoch 0 and 0.25/2 = 0.125 in
epoch 1, so (lr·s)² = 1/16 then 1/64. Importance per visit and layer [enc, head]:
  row 0 s0 e0 [4,0]  -> [0.25, 0]        row 4 s3 e1 [8,0]  -> [0.125, 0]
  row 1 s1 e0 [1,1]  -> [1/16, 1/16]     row 5 s0 e1 [0,0]  -> [0, 0]
  row 2 s2 e0 [0,4]  -> [0, 0.25]        row 6 s1 e1 [4,4]  -> [1/16, 1/16]
  row 3 s3 e0 [2,7]  -> [1/8, 7/16]      row 7 s2 e1 [16,0] -> [0.25, 0]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr
from tracefiles import write_tiny_trace

from samplescope.analysis import Trace, open_trace

EXPECTED = {
    # sample:          s0      s1      s2      s3
    "importance": [0.25, 0.25, 0.5, 0.6875],
    "importance_0": [0.25, 0.125, 0.25, 0.25],
    "importance_1": [0.0, 0.125, 0.25, 0.4375],
    "share_0": [1.0, 0.5, 0.5, 4 / 11],
    "share_1": [0.0, 0.5, 0.5, 7 / 11],
    "when": [0.0, 0.5, 0.5, 2 / 11],
    "where": [0.0, 0.5, 0.5, 7 / 11],
    "final_loss": [1.5, 0.2, 0.1, 2.5],
    "difficulty_rank": [2, 1, 0, 3],
    "difficulty_decile": [5, 2, 0, 7],
    "confidence": [0.35, 0.4, 0.75, 0.25],
    "variability": [0.15, 0.1, 0.15, 0.15],
    "correctness": [0.5, 0.5, 1.0, 0.5],
    "forgetting_events": [0, 1, 0, 0],
    "aum": [-0.45, 0.0, 2.0, -0.9],
    "aum_after_first": [0.1, -0.5, 3.0, 0.2],
    "el2n_proxy": [0.8, 0.5, 0.4, 0.9],
    "grand": [2.0, math.sqrt(2), 2.0, 3.0],
    "tracin_self": [1.0, 1.5, 3.0, 3.25],
    "input_sq": [1.0, 2.0, 3.0, 2.5],
    "n_visits": [2, 2, 2, 2],
    "target": [0, 1, 0, 1],
}


@pytest.mark.parametrize("column", sorted(EXPECTED))
def test_sample_score_matches_hand_computation(tiny: Trace, column: str) -> None:
    got = tiny.samples().sort("sample_id")[column].to_list()
    np.testing.assert_allclose(got, EXPECTED[column], rtol=1e-6, atol=1e-7)


def test_samples_final_correct_and_sample_info(tiny: Trace) -> None:
    samples = tiny.samples().sort("sample_id")
    assert samples["final_correct"].to_list() == [True, False, True, True]
    assert samples["flipped"].to_list() == [0, 1, 0, 0]
    # sample_info's own `target` clashes with the score and is kept as info_target.
    assert samples["info_target"].to_list() == [0, 1, 0, 1]
    assert samples["input_grad_sq"].null_count() == 4


def test_early_epochs_window(tiny: Trace) -> None:
    samples = tiny.samples(early_epochs=2).sort("sample_id")
    # s0 visits grad_sq [4,0] then [0,0]: mean of sqrt(4) and sqrt(0).
    assert samples["grand"][0] == pytest.approx(1.0)
    assert samples["el2n_proxy"][0] == pytest.approx((0.8 + 0.5) / 2)


def test_samples_sort_and_top(tiny: Trace) -> None:
    top = tiny.samples(sort="importance", top=2)
    assert top["sample_id"].to_list() == [3, 2]
    low = tiny.samples(sort="final_loss", descending=False, top=1)
    assert low["sample_id"].to_list() == [2]


def test_visits_free_trace_gives_null_output_scores(tmp_path: Path) -> None:
    with open_trace(write_tiny_trace(tmp_path / "t.h5", outputs=False)) as trace:
        samples = trace.samples().sort("sample_id")
        assert trace.meta["has_outputs"] is False
    for column in (
        "target",
        "final_correct",
        "confidence",
        "variability",
        "correctness",
        "forgetting_events",
        "aum",
        "el2n_proxy",
    ):
        assert samples[column].null_count() == 4, column
    np.testing.assert_allclose(samples["importance"].to_list(), EXPECTED["importance"])
    np.testing.assert_allclose(samples["final_loss"].to_list(), EXPECTED["final_loss"])


def test_sample_epochs_rank_and_zscore(tiny: Trace) -> None:
    table = tiny.sample_epochs()
    assert table.height == 4 * 2 * 2
    enc0 = table.filter((pl.col("epoch") == 0) & (pl.col("layer") == "enc")).sort("sample_id")
    values = np.array([0.25, 1 / 16, 0.0, 1 / 8])
    np.testing.assert_allclose(enc0["importance"].to_list(), values)
    np.testing.assert_allclose(enc0["grad_sq"].to_list(), [4, 1, 0, 2])
    assert enc0["importance_rank"].to_list() == [0, 2, 3, 1]
    np.testing.assert_allclose(
        enc0["importance_z"].to_list(), (values - values.mean()) / values.std()
    )


def test_correlations_match_scipy(tiny: Trace) -> None:
    table = tiny.correlations()
    final = np.array(EXPECTED["final_loss"])
    per_epoch_layer = {
        (0, 0): [0.25, 1 / 16, 0, 1 / 8],
        (0, 1): [0, 1 / 16, 0.25, 7 / 16],
        (1, 0): [0, 1 / 16, 0.25, 1 / 8],
        (1, 1): [0, 1 / 16, 0, 0],
    }
    for (epoch, layer), importance in per_epoch_layer.items():
        row = table.filter((pl.col("epoch") == epoch) & (pl.col("layer_index") == layer))
        assert row["n_samples"].item() == 4
        assert row["spearman"].item() == pytest.approx(spearmanr(importance, final)[0])
    overall = table.filter(pl.col("epoch").is_null() & pl.col("layer_index").is_null())
    assert overall["spearman"].item() == pytest.approx(spearmanr(EXPECTED["importance"], final)[0])


def test_groups_shares(tiny: Trace) -> None:
    table = tiny.groups()

    # ranks by total importance: s3 top10, s2 next10, s0 and s1 rest (m = ceil(4/10) = 1).
    def share(group: str, layer: int | None) -> float:
        cond = (
            (pl.col("layer_index") == layer)
            if layer is not None
            else pl.col("layer_index").is_null()
        )
        return table.filter((pl.col("group") == group) & cond)["share"].item()

    assert share("top10", 0) == pytest.approx(2 / 7)
    assert share("top10", 1) == pytest.approx(7 / 13)
    assert share("next10", 1) == pytest.approx(4 / 13)
    assert share("rest", 0) == pytest.approx(3 / 7)
    assert share("rest", None) == pytest.approx(0.5 / 1.6875)
    assert table.filter(pl.col("group") == "rest")["n_samples"].to_list() == [2, 2, 2]


def test_evals_and_layers(tiny: Trace) -> None:
    assert tiny.evals().to_dicts()[1] == {
        "step": 4,
        "epoch": 1,
        "split": "test",
        "loss": 0.9,
        "accuracy": 0.75,
    }
    assert tiny.layers().to_dicts()[1] == {
        "layer_index": 1,
        "layer": "head",
        "kind": "Linear",
        "n_params": 2,
        "method": "identity",
    }


def test_meta(tiny: Trace) -> None:
    meta = tiny.meta
    assert (meta["n_steps"], meta["n_visits"], meta["n_samples"]) == (4, 8, 4)
    assert meta["layers"] == ["enc", "head"]
    assert meta["closed"] is True
    assert meta["config"] == {"seed": 0}
    assert meta["optimizer_hparams"]["lr"] == 0.5
    assert meta["has_outputs"] is True
    assert meta["optional_columns"] == ["target", "pred", "p_target", "margin", "input_sq"]
