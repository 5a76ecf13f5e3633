"""Scores as their authors define them: forgetting events of never-learned samples, AUM
after the first epoch, the true EL2N from the recorded `el2n` column. Both the streaming
path of `samples()` and the in-memory Polars path must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars_oracle import sample_scores
from tracefiles import write_trace

from samplescope.analysis import open_trace

# 3 samples x 3 epochs, one step of 3 per epoch. Correct at each visit:
#   s0: no, no, no     (never learned -> max count, its 3 visits)
#   s1: yes, no, yes   (1 forgetting event)
#   s2: yes, yes, yes  (0)
CORRECT = {0: [0, 0, 0], 1: [1, 0, 1], 2: [1, 1, 1]}
MARGIN = {0: [-1.0, -2.0, -3.0], 1: [1.0, -1.0, 2.0], 2: [0.5, 1.5, 2.5]}
EL2N = {0: [1.2, 1.3, 1.4], 1: [0.4, 0.9, 0.2], 2: [0.3, 0.1, 0.05]}


def _write(path: Path, *, el2n: bool) -> Path:
    visits: dict[str, list] = {
        k: [] for k in ("step", "sample_id", "loss", "grad_sq", "target", "pred", "margin")
    }
    visits["p_target"] = []
    if el2n:
        visits["el2n"] = []
    for epoch in range(3):
        for sample in range(3):
            ok = CORRECT[sample][epoch]
            visits["step"].append(epoch)
            visits["sample_id"].append(sample)
            visits["loss"].append(1.0 + sample)
            visits["grad_sq"].append([1.0, 1.0])
            visits["target"].append(0)
            visits["pred"].append(0 if ok else 1)
            visits["margin"].append(MARGIN[sample][epoch])
            visits["p_target"].append(0.7 if ok else 0.2)
            if el2n:
                visits["el2n"].append(EL2N[sample][epoch])
    return write_trace(
        path,
        layers=["fc1", "fc2"],
        steps={"step": [0, 1, 2], "epoch": [0, 1, 2], "lr": [0.1] * 3, "batch_size": [3] * 3},
        visits={
            k: np.asarray(v, dtype=np.float32 if k == "el2n" else None) for k, v in visits.items()
        },
    )


def _both_paths(path: Path, early_epochs: int = 1) -> list[pl.DataFrame]:
    with open_trace(path) as trace:
        streamed = trace.samples(early_epochs=early_epochs).sort("sample_id")
        in_memory = sample_scores(trace, early_epochs).sort("sample_id")
    return [streamed, in_memory]


@pytest.mark.parametrize("path_index", [0, 1])
def test_never_learned_samples_get_the_maximum_forgetting_count(
    tmp_path: Path, path_index: int
) -> None:
    frame = _both_paths(_write(tmp_path / "t.h5", el2n=True))[path_index]
    assert frame["forgetting_events"].to_list() == [3, 1, 0]


@pytest.mark.parametrize("path_index", [0, 1])
def test_aum_after_first_epoch(tmp_path: Path, path_index: int) -> None:
    frame = _both_paths(_write(tmp_path / "t.h5", el2n=True))[path_index]
    np.testing.assert_allclose(frame["aum"], [-2.0, 2 / 3, 1.5], rtol=1e-6)
    np.testing.assert_allclose(frame["aum_after_first"], [-2.5, 0.5, 2.0], rtol=1e-6)


@pytest.mark.parametrize("path_index", [0, 1])
def test_el2n_is_the_mean_recorded_value_over_early_epochs(tmp_path: Path, path_index: int) -> None:
    path = _write(tmp_path / "t.h5", el2n=True)
    frame = _both_paths(path)[path_index]
    np.testing.assert_allclose(frame["el2n"], [1.2, 0.4, 0.3], rtol=1e-6)
    two = _both_paths(path, early_epochs=2)[path_index]
    np.testing.assert_allclose(two["el2n"], [1.25, 0.65, 0.2], rtol=1e-6)
    # The proxy stays beside it.
    np.testing.assert_allclose(frame["el2n_proxy"], [0.8, 0.3, 0.3], rtol=1e-6)


@pytest.mark.parametrize("path_index", [0, 1])
def test_old_traces_without_el2n_keep_the_proxy(tmp_path: Path, path_index: int) -> None:
    frame = _both_paths(_write(tmp_path / "t.h5", el2n=False))[path_index]
    assert frame["el2n"].null_count() == 3
    np.testing.assert_allclose(frame["el2n_proxy"], [0.8, 0.3, 0.3], rtol=1e-6)
