"""ReportData's numbers, checked against sums done by hand on small traces."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from reporttraces import write_outputs_trace

from samplescope.analysis import open_trace
from samplescope.reports import _data as report_data
from samplescope.reports._data import (
    ReportData,
    ReportPlan,
    average_precision,
    pct_rank,
    precision_recall,
)
from samplescope.reports.candidates import candidate_tables
from samplescope.reports.heatmaps import _column_share


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ReportData:
    path = write_outputs_trace(tmp_path_factory.mktemp("d") / "t.h5", bad=(7, 11))
    return ReportData(open_trace(path), path)


def test_report_data_is_read_only(data: ReportData) -> None:
    for name in ("report_title", "included", "omitted", "trace", "path"):
        with pytest.raises(AttributeError):
            setattr(data, name, None)
    planned = data.with_plan(ReportPlan("T", (("summary", "Run summary"),), ()))
    assert planned.report_title == "T"
    assert list(planned.included) == [("summary", "Run summary")]
    assert data.report_title == "samplescope report"


def test_rank_heatmap_is_mean_per_sample_of_each_bin(data: ReportData) -> None:
    frame, n_bins = data.rank_epoch
    assert n_bins == data.n_samples == 60  # fewer samples than MAX_HEATMAP_ROWS: one each
    per_sample = data.trace.sql(
        "SELECT s.difficulty_rank AS bin, e.epoch + 1 AS epoch, sum(e.importance) AS imp "
        "FROM sample_epochs e JOIN samples s USING (sample_id) WHERE e.layer_index = 0 "
        "GROUP BY ALL"
    ).pl()
    grid = data.grid(frame, 0, n_bins)
    for row in per_sample.iter_rows(named=True):
        assert grid[row["bin"], data.epochs.index(row["epoch"])] == pytest.approx(row["imp"])


def test_decile_share_columns_sum_to_100(data: ReportData) -> None:
    deciles = data.decile_epoch()
    for layer in range(data.layers.height):
        raw = data.grid(deciles, layer, 10)
        share = _column_share(raw)
        np.testing.assert_allclose(share.sum(axis=0), 100.0)
        # Each cell is the decile's part of the epoch's total for the layer.
        epoch_total = data.layer_epoch.filter(pl.col("layer_index") == layer)["importance"]
        np.testing.assert_allclose(raw.sum(axis=0), epoch_total.to_numpy(), rtol=1e-9)


def test_column_share_leaves_empty_epochs_blank() -> None:
    share = _column_share(np.array([[1.0, 0.0], [3.0, 0.0]]))
    np.testing.assert_allclose(share[:, 0], [25.0, 75.0])
    assert np.isnan(share[:, 1]).all()


def test_mislabeled_candidates_rank_suspect_samples_first(data: ReportData) -> None:
    mislabeled, redundant = candidate_tables(data, top=5)
    # The planted samples have the lowest AUM and confidence and the largest gradients.
    assert set(mislabeled["sample_id"].head(2).to_list()) == {7, 11}
    assert mislabeled["score"].is_sorted(descending=True)
    assert mislabeled["score"][1] > 0.98  # both near the top of all three ranks
    # Redundant: never a planted sample, lowest importance first.
    assert not {7, 11} & set(redundant["sample_id"].to_list())
    assert redundant["importance"].is_sorted()


def test_precision_recall_by_hand() -> None:
    score = np.array([0.9, 0.8, 0.7, 0.1])
    truth = np.array([True, False, True, False])
    precision, recall = precision_recall(score, truth)
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1, 1])
    assert average_precision(score, truth) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(score, np.zeros(4, dtype=bool)))


def test_pct_rank_by_hand() -> None:
    frame = pl.DataFrame({"x": [3.0, 1.0, 2.0, 2.0, 5.0]})
    up = frame.select(pct_rank("x")).to_series().to_list()
    down = frame.select(pct_rank("x", descending=True)).to_series().to_list()
    # Ranks 4, 1, 2.5, 2.5, 5 of 5: (rank - 1) / 4; the largest is 1 ascending, 0 descending.
    assert up == pytest.approx([0.75, 0.0, 0.375, 0.375, 1.0])
    assert down == pytest.approx([0.25, 1.0, 0.625, 0.625, 0.0])
    assert pl.DataFrame({"x": [4.0]}).select(pct_rank("x")).item() == 0.0


def test_rank_heatmap_bins_average_over_each_bins_samples(
    data: ReportData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more samples than rows, a cell is the bin's importance over the bin's size."""
    monkeypatch.setattr(report_data, "MAX_HEATMAP_ROWS", 7)  # 60 samples: bins of 8 or 9
    fresh = ReportData(data.trace, data.path)
    frame, n_bins = fresh.rank_epoch
    assert n_bins == 7
    samples = data.trace.sql("SELECT sample_id, difficulty_rank FROM samples").pl()
    per = data.trace.sql(
        "SELECT sample_id, epoch, sum(importance) AS imp FROM sample_epochs "
        "WHERE layer_index = 1 GROUP BY ALL"
    ).pl()
    rank = dict(samples.iter_rows())
    bin_of = {s: r * 7 // 60 for s, r in rank.items()}
    sizes = np.bincount(list(bin_of.values()), minlength=7)
    assert sorted(set(sizes.tolist())) == [8, 9]
    expected = np.zeros((7, len(data.epochs)))
    for s, e, imp in per.iter_rows():
        expected[bin_of[s], e] += imp
    expected /= sizes[:, None]
    np.testing.assert_allclose(fresh.grid(frame, 1, n_bins), expected, rtol=1e-9)


def test_candidate_scores_rank_the_right_end_first(data: ReportData) -> None:
    """Mislabeled: lowest confidence first; redundant: lowest importance first (score 1)."""
    mislabeled, redundant = candidate_tables(data, top=60)
    confidence = mislabeled["confidence"].to_numpy()
    assert (np.diff(confidence) >= -1e-12).all()  # the score falls as confidence rises
    # The two planted samples tie at the lowest confidence: both share the top ranks.
    assert mislabeled["score"][0] == mislabeled["score"][1] > mislabeled["score"][2]
    eligible = data.samples.join(data.final_pred, on="sample_id").filter(
        pl.col("final_correct") & (pl.col("forgetting_events") == 0)
    )
    assert redundant.height == eligible.height > 1
    least = eligible.sort("importance")["sample_id"][0]
    assert redundant["sample_id"][0] == least
    assert redundant["score"][0] == pytest.approx(1.0)
    assert redundant["score"][-1] == pytest.approx(0.0)
