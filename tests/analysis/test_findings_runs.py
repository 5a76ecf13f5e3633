"""findings across runs: difficulty from another seed's run, and several seeds pooled."""

from __future__ import annotations

from pathlib import Path

import pytest
from findingsworlds import write_world

from samplescope.analysis import open_trace
from samplescope.analysis.findings import (
    CLAIMS,
    FindingsError,
    findings,
    findings_frame,
    findings_runs,
    group_runs,
)


def test_difficulty_from_another_run(tmp_path: Path) -> None:
    # Same data (same difficulty per sample), another seed's noise and batches.
    run = write_world(tmp_path / "a.h5", 0)
    other = write_world(tmp_path / "b.h5", 1, data_seed=0)
    with open_trace(run) as trace:
        own = findings(trace, n_boot=100)
        crossed = findings(trace, difficulty_from=other, n_boot=100)
    assert {f.verdict for f in crossed} == {"supported"}
    assert crossed[0].difficulty_source == f"final loss in {other}"
    assert own[0].difficulty_source == "this run's final loss"
    # The same world: taking difficulty elsewhere changes the estimates, not the picture.
    assert crossed[0].effect.estimate != own[0].effect.estimate  # type: ignore[union-attr]
    assert findings_frame(crossed)["difficulty"][0] == f"final loss in {other}"


def test_difficulty_from_a_run_of_other_data_is_refused(tmp_path: Path) -> None:
    run = write_world(tmp_path / "a.h5", 0)
    other = write_world(tmp_path / "b.h5", 1, sample_offset=10_000)
    with open_trace(run) as trace, pytest.raises(FindingsError, match="shares only 0 of"):
        findings(trace, difficulty_from=other)


def test_several_seeds_give_per_run_and_pooled_verdicts(tmp_path: Path) -> None:
    paths = [write_world(tmp_path / f"s{i}.h5", i, data_seed=0) for i in range(3)]
    traces = [open_trace(p) for p in paths]
    try:
        results = findings_runs(traces, n_boot=100)
    finally:
        for trace in traces:
            trace.close()
    assert [f.run for f in results] == [r for r in ("0", "1", "2", "pooled") for _ in CLAIMS]
    pooled = [f for f in results if f.run == "pooled"]
    assert [f.claim for f in pooled] == list(CLAIMS)
    for claim_index, result in enumerate(pooled):
        per_run = [results[r * len(CLAIMS) + claim_index] for r in range(3)]
        expected = sum(f.verdict == result.verdict for f in per_run) / 3
        assert result.agreement == pytest.approx(expected)
        mean = sum(f.effect.estimate for f in per_run) / 3  # type: ignore[union-attr]
        assert result.effect.estimate == pytest.approx(mean)  # type: ignore[union-attr]
    assert {f.verdict for f in pooled} == {"supported"}
    frame = findings_frame(results)
    assert frame.columns[:3] == ["run", "claim", "verdict"]
    assert "agreement" in frame.columns


def test_pooled_is_inconclusive_when_a_run_is(tmp_path: Path) -> None:
    paths = [
        write_world(tmp_path / "s0.h5", 0),
        write_world(tmp_path / "s1.h5", 1, data_seed=0, epochs=3),
    ]
    traces = [open_trace(p) for p in paths]
    try:
        results = findings_runs(traces, n_boot=50)
    finally:
        for trace in traces:
            trace.close()
    pooled = [f for f in results if f.run == "pooled"]
    assert {f.verdict for f in pooled} == {"inconclusive"}
    assert pooled[0].explanation.startswith(
        "Inconclusive: run 1 is inconclusive (the trace covers 3"
    )


def test_runs_of_other_data_are_refused(tmp_path: Path) -> None:
    a = open_trace(write_world(tmp_path / "a.h5", 0))
    b = open_trace(write_world(tmp_path / "b.h5", 1, sample_offset=10_000))
    try:
        with pytest.raises(FindingsError, match="pool only runs of the same data"):
            findings_runs([a, b])
    finally:
        a.close()
        b.close()


def test_group_runs_joins_shards_and_splits_seeds(tmp_path: Path) -> None:
    a = write_world(tmp_path / "a.h5", 0, run_id="r1")
    b = write_world(tmp_path / "b.h5", 1, run_id="r2")
    c = write_world(tmp_path / "c.h5", 2, run_id="r1")
    assert group_runs([a, b, c]) == [[str(a), str(c)], [str(b)]]
