"""Calibration of `findings`: on permuted-null runs a claim is supported in at most 5% of
runs; on runs where every claim holds, nearly always (worlds in findingsworlds.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from findingsworlds import write_world

from samplescope.analysis import open_trace
from samplescope.analysis.findings import CLAIMS, findings

pytestmark = pytest.mark.slow

N_NULL = 40
N_POSITIVE = 20


def _rates(tmp_path: Path, runs: int, *, null: bool) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {claim: Counter() for claim in CLAIMS}
    for seed in range(runs):
        path = write_world(tmp_path / f"run{seed}.h5", 1000 + seed, null=null)
        with open_trace(path) as trace:
            for result in findings(trace):
                counts[result.claim][result.verdict] += 1
        path.unlink()
    return counts


def test_null_runs_are_rarely_supported(tmp_path: Path) -> None:
    counts = _rates(tmp_path, N_NULL, null=True)
    for claim, verdicts in counts.items():
        assert verdicts["supported"] <= 0.05 * N_NULL, (claim, dict(verdicts))
        # Not even the raw effect should clear often: importance here says nothing.
        assert verdicts["raw sums only"] <= 0.1 * N_NULL, (claim, dict(verdicts))
        assert verdicts["inconclusive"] == 0, (claim, dict(verdicts))


def test_positive_runs_are_supported(tmp_path: Path) -> None:
    counts = _rates(tmp_path, N_POSITIVE, null=False)
    for claim, verdicts in counts.items():
        assert verdicts["supported"] >= 0.85 * N_POSITIVE, (claim, dict(verdicts))
