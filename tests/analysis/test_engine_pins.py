"""The one streaming engine (`analysis/_streaming.py`) against the in-memory definitions it
replaced (`polars_oracle`), on small traces that exercise every branch it has: samples
visited twice inside one chunk, chunks that split an epoch, two shards, epochs out of step
order, rows without outputs (format v2), traces without outputs at all. The engine reads
these traces in chunks of a few rows, so every boundary case is crossed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from polars_oracle import (
    cluster_samples,
    correlations,
    epoch_loss,
    epoch_scores,
    findings_arrays,
    sample_epochs,
    sample_scores,
)
from tracefiles import write_tiny_trace, write_trace

from samplescope.analysis import Trace, open_trace
from samplescope.analysis import _streaming as streaming
from samplescope.analysis._findings_data import PERIOD_FRACTION, gather

LAYERS = ["conv", "fc1", "fc2"]


def _random_visits(
    rng: np.random.Generator, steps: list[int], batch: int, n_samples: int, *, outputs: bool
) -> dict[str, np.ndarray]:
    n = len(steps) * batch
    visits: dict[str, np.ndarray] = {
        "step": np.repeat(steps, batch),
        # With replacement: some samples come twice in one step or chunk.
        "sample_id": rng.integers(0, n_samples, n) * 3 + 5,
        "loss": rng.gamma(2.0, 0.5, n),
        "grad_sq": rng.gamma(1.0, 2.0, (n, len(LAYERS))) * (rng.random((n, 1)) > 0.05),
        "input_sq": rng.gamma(3.0, 1.0, n),
        "el2n": (rng.random(n) * 1.4).astype(np.float32),
    }
    if outputs:
        target = rng.integers(0, 3, n)
        target[rng.random(n) < 0.1] = -1  # v2: this row recorded no logits
        visits.update(
            target=target,
            pred=np.where(rng.random(n) < 0.6, target, (target + 1) % 3),
            p_target=rng.random(n),
            margin=rng.normal(0.0, 1.0, n),
        )
    return visits


def _write_random(
    path: Path,
    seed: int,
    *,
    epochs: list[int],
    outputs: bool = True,
    rank: int = 0,
    world_size: int = 1,
    step_offset: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    steps_per_epoch, batch = 3, 7
    steps = [step_offset + 2 * s for s in range(len(epochs) * steps_per_epoch)]
    lr = np.repeat(np.linspace(0.5, 0.05, len(epochs)), steps_per_epoch)
    return write_trace(
        path,
        layers={"name": LAYERS, "n_params": [30, 20, 10]},
        steps={
            "step": steps,
            "epoch": np.repeat(epochs, steps_per_epoch),
            "lr": lr,
            "batch_size": [batch] * len(steps),
        },
        visits=_random_visits(rng, steps, batch, 12, outputs=outputs),
        attrs={"format_version": 2},
        rank=rank,
        world_size=world_size,
    )


def _sources(tmp: Path) -> dict[str, list[Path]]:
    return {
        "tiny": [write_tiny_trace(tmp / "tiny.h5")],
        "tiny_no_outputs": [write_tiny_trace(tmp / "tiny_no.h5", outputs=False)],
        "random": [_write_random(tmp / "r.h5", 0, epochs=[0, 1, 2, 3])],
        "no_outputs": [_write_random(tmp / "n.h5", 1, epochs=[0, 1, 2], outputs=False)],
        # Epochs out of step order: a sample's epochs are not contiguous in time.
        "epochs_out_of_order": [_write_random(tmp / "o.h5", 2, epochs=[0, 1, 0, 2])],
        "shards": [
            _write_random(tmp / "s.rank0.h5", 3, epochs=[0, 1, 2], rank=0, world_size=2),
            _write_random(
                tmp / "s.rank1.h5", 4, epochs=[0, 1, 2], rank=1, world_size=2, step_offset=0
            ),
        ],
    }


NAMES = ["tiny", "tiny_no_outputs", "random", "no_outputs", "epochs_out_of_order", "shards"]


@pytest.fixture(params=NAMES)
def trace(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Chunks of 8 rows: batches of 7 straddle them, epochs split across several chunks.
    monkeypatch.setattr(streaming, "_CHUNK_ROWS", 8)
    paths = _sources(tmp_path)[request.param]
    with open_trace(paths) as opened:
        yield opened


def _close(actual: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert_frame_equal(actual, expected, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("early_epochs", [1, 2])
def test_samples_equal_the_in_memory_definitions(trace: Trace, early_epochs: int) -> None:
    _close(trace.samples(early_epochs=early_epochs), sample_scores(trace, early_epochs))


def test_sample_epochs_equal_the_in_memory_definitions(trace: Trace) -> None:
    _close(trace.sample_epochs(), sample_epochs(trace))


def test_importance_view_sql_and_polars_agree_with_sample_epochs(trace: Trace) -> None:
    expected = (
        sample_epochs(trace)
        .select("sample_id", "epoch", "layer_index", "importance", "grad_sq")
        .sort("sample_id", "epoch", "layer_index")
    )
    sql = trace.query(
        "SELECT sample_id, epoch, layer_index, sum(importance) AS importance, "
        "sum(grad_sq) AS grad_sq FROM importance GROUP BY ALL ORDER BY 1, 2, 3"
    )
    lazy = (
        trace.table("importance")
        .group_by("sample_id", "epoch", "layer_index")
        .agg(pl.col("importance").sum(), pl.col("grad_sq").sum())
        .sort("sample_id", "epoch", "layer_index")
        .collect()
    )
    _close(sql, expected)
    _close(lazy, expected)


def test_findings_arrays_equal_the_in_memory_fold(trace: Trace) -> None:
    data = gather(trace)
    expected = findings_arrays(trace, PERIOD_FRACTION)
    np.testing.assert_array_equal(data.sample_ids, expected["sample_ids"])
    np.testing.assert_array_equal(data.epochs, expected["epochs"])
    np.testing.assert_array_equal(data.visits, expected["visits"])
    np.testing.assert_allclose(data.imp, expected["imp"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(data.period, expected["period"], rtol=1e-12, atol=1e-15)


def test_clusters_use_the_epoch_losses_of_the_visits(trace: Trace) -> None:
    expected = cluster_samples(
        sample_epochs(trace), epoch_loss(trace), sample_scores(trace), k=3, seed=0
    )
    _close(trace.clusters(k=3, seed=0), expected)


def test_tables_built_on_sample_epochs_are_unchanged(trace: Trace) -> None:
    from samplescope.analysis import scores

    _close(trace.correlations(), correlations(sample_epochs(trace), sample_scores(trace)))
    _close(trace.groups(), scores.groups(sample_scores(trace), trace.layers()))


def test_flag_scores_from_sample_epochs_are_unchanged(trace: Trace) -> None:
    from samplescope.analysis.flags import LATE_FRACTION, score_table

    table = score_table(trace).select("sample_id", "importance_late", "importance_rank")
    expected = epoch_scores(sample_epochs(trace), LATE_FRACTION)
    _close(table, expected.sort("sample_id"))


def test_compare_of_a_run_with_itself_is_one(trace: Trace, tmp_path: Path) -> None:
    from samplescope.analysis import compare_traces

    paths = [str(p) for p in trace.paths]
    frame = compare_traces([paths, paths])
    n = sample_epochs(trace).group_by("epoch").agg(pl.col("sample_id").n_unique())
    counts = dict(zip(n["epoch"].to_list(), n["sample_id"].to_list(), strict=True))
    for row in frame.iter_rows(named=True):
        expected = counts[row["epoch"]] if row["epoch"] is not None else trace.samples().height
        assert row["n_samples"] == expected


def test_sample_epochs_sql_view_equals_the_table(trace: Trace) -> None:
    view = trace.query("SELECT * FROM sample_epochs ORDER BY epoch, layer_index, sample_id")
    _close(view, sample_epochs(trace))
