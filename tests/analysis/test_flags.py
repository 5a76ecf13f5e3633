"""flag(): ranked order, direction and budget mask on a tiny hand-made trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tracefiles import write_trace

from samplescope.analysis import open_trace
from samplescope.analysis.flags import FlagError, flag, score_names

N = 10


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    # Two epochs of one batch each; sample i has p_target (0.95 - 0.09 i): sample 9 is the
    # least confident, and grad_sq (i + 1) so sample 0 is the least important.
    ids = np.tile(np.arange(N), 2)
    p = 0.95 - 0.09 * ids
    return write_trace(
        tmp_path / "t.h5",
        layers=["fc1", "fc2"],
        steps={"step": [0, 1], "epoch": [0, 1], "lr": [0.1, 0.1], "batch_size": [N, N]},
        visits={
            "step": np.repeat([0, 1], N),
            "sample_id": ids,
            "loss": -np.log(p),
            "grad_sq": np.stack([ids + 1.0, 2 * (ids + 1.0)], 1),
            "target": ids % 2,
            "pred": ids % 2,
            "p_target": p,
            "margin": p - 0.5,
        },
        sample_info={"sample_id": np.arange(N), "flipped": np.arange(N) >= 8},
    )


def test_mislabeled_ranks_least_confident_first(trace_path: Path) -> None:
    with open_trace(trace_path) as trace:
        frame = flag(trace, kind="mislabeled", budget=0.2)
    assert frame["sample_id"].to_list() == list(range(N - 1, -1, -1))
    assert frame["rank"].to_list() == list(range(N))
    assert frame["flagged"].to_list() == [True, True] + [False] * (N - 2)
    assert frame["label_quality"].is_sorted()
    assert frame["label_quality"][0] == pytest.approx(0.0)
    assert frame["label_quality"][-1] == pytest.approx(1.0)


def test_redundant_flags_least_important_with_a_count_budget(trace_path: Path) -> None:
    with open_trace(trace_path) as trace:
        frame = flag(trace, kind="redundant", budget=3)
    assert frame["sample_id"].head(3).to_list() == [0, 1, 2]
    assert frame["flagged"].sum() == 3
    assert "informativeness" in frame.columns


def test_score_table_orientation(trace_path: Path) -> None:
    with open_trace(trace_path) as trace:
        names = score_names(trace)
        frame = flag(trace, kind="mislabeled", budget=1, score="aum")
    assert {
        "importance",
        "importance_late",
        "importance_rank",
        "importance_layer0",
        "final_loss",
        "aum",
        "confidence",
        "el2n_proxy",
        "tracin_self",
    } <= set(names)
    # This trace has no recorded el2n column: only the proxy is offered, under its name.
    assert "el2n" not in names
    assert frame["sample_id"][0] == N - 1  # lowest margin = most suspect
    assert frame.schema["flagged"] == pl.Boolean


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "noisy"}, "kind must be one of"),
        ({"score": "nope"}, "unknown score"),
        ({"budget": 0}, "budget must be"),
        ({"budget": 2.5}, "must be whole"),
    ],
)
def test_bad_arguments(trace_path: Path, kwargs: dict, message: str) -> None:
    with open_trace(trace_path) as trace, pytest.raises(FlagError, match=message):
        flag(trace, **kwargs)
