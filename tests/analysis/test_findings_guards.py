"""findings(): runs that cannot carry a verdict say why, and give none."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from findingsworlds import write_world

from samplescope.analysis import open_trace
from samplescope.analysis.findings import CLAIMS, findings, headlines


def _only_inconclusive(path: Path) -> str:
    with open_trace(path) as trace:
        results = findings(trace)
        lines = headlines(trace, results)
    assert [f.verdict for f in results] == ["inconclusive"] * len(CLAIMS)
    assert all(f.effect is None for f in results)
    assert lines == [results[0].explanation]
    return results[0].explanation


def test_a_good_run_gets_verdicts(tmp_path: Path) -> None:
    with open_trace(write_world(tmp_path / "t.h5", 0)) as trace:
        assert {f.verdict for f in findings(trace)} == {"supported"}


def test_short_run_is_inconclusive(tmp_path: Path) -> None:
    why = _only_inconclusive(write_world(tmp_path / "t.h5", 0, epochs=3))
    assert why == (
        "Inconclusive: the trace covers 3 epoch(s); at least 5 are needed to say when in "
        "training samples mattered."
    )


def test_open_trace_is_inconclusive(tmp_path: Path) -> None:
    why = _only_inconclusive(write_world(tmp_path / "t.h5", 0, closed=False))
    assert why.startswith("Inconclusive: the trace is still open")


def test_partial_last_epoch_is_inconclusive(tmp_path: Path) -> None:
    path = write_world(tmp_path / "t.h5", 0)
    # Cut the trace after the first two of the last epoch's four steps.
    with h5py.File(path, "a") as f:
        keep_steps = len(f["steps/step"]) - 2
        keep_visits = int(f["steps/visit_start"][keep_steps])
        for name in f["steps"]:
            f[f"steps/{name}"].resize(keep_steps, axis=0)
        for name in f["visits"]:
            f[f"visits/{name}"].resize(keep_visits, axis=0)
    why = _only_inconclusive(path)
    assert (
        why
        == "Inconclusive: the last epoch is partial (100 visits against 200 in a typical epoch)."
    )


def test_unconverged_run_is_inconclusive(tmp_path: Path) -> None:
    why = _only_inconclusive(write_world(tmp_path / "t.h5", 0, flat_loss=True))
    assert why.startswith("Inconclusive: training did not converge: the mean training loss")


def test_model_at_chance_is_inconclusive(tmp_path: Path) -> None:
    # Random labels: the loss falls (memorisation) but the test accuracy stays at chance.
    path = write_world(
        tmp_path / "t.h5",
        0,
        evals={
            "step": [24],
            "epoch": [5],
            "split": ["test"],
            "loss": [2.3],
            "accuracy": [0.11],
        },
    )
    rng = np.random.default_rng(0)
    with h5py.File(path, "a") as f:
        n = len(f["visits/step"])
        f["visits"].create_dataset("target", data=rng.integers(0, 10, n))
        f["visits"].create_dataset("pred", data=rng.integers(0, 10, n))
        f["visits"].create_dataset("p_target", data=np.full(n, 0.1, np.float32))
        f["visits"].create_dataset("margin", data=np.full(n, -0.1, np.float32))
    why = _only_inconclusive(path)
    assert (
        why
        == "Inconclusive: the model did not learn: final test accuracy 0.110 against chance 0.100."
    )


@pytest.mark.parametrize("n_boot", [50])
def test_intervals_are_ordered_and_reported(tmp_path: Path, n_boot: int) -> None:
    with open_trace(write_world(tmp_path / "t.h5", 3)) as trace:
        results = findings(trace, n_boot=n_boot)
    for result in results:
        assert result.effect is not None
        assert result.effect.low <= result.effect.high
        assert result.numbers["ci_low"] == result.effect.low
        for control in result.intervals.values():
            assert control.low <= control.high
