"""findings(): verdicts on tiny hand-made traces whose answer is known by construction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tracefiles import write_trace

from samplescope.analysis import open_trace
from samplescope.analysis.findings import CLAIMS, VERDICTS, findings, findings_frame, headlines

N = 40  # samples; sample i has final loss ~ i, so ids 0-3 are the easy decile, 36-39 hard
EPOCHS = 5
BATCH = 20

# grad_sq(sample, layer, epoch) -> value; layer 0 is the input layer, 1 the output layer.
GradFn = Callable[[int, int, int], float]


def _write(path: Path, grad: GradFn, input_sq: Callable[[int], float] = lambda i: 1.0) -> Path:
    steps: dict[str, list] = {"step": [], "epoch": [], "lr": [], "batch_size": []}
    visits: dict[str, list] = {
        k: []
        for k in (
            "step",
            "sample_id",
            "loss",
            "grad_sq",
            "target",
            "pred",
            "p_target",
            "margin",
            "input_sq",
        )
    }
    step = 0
    for epoch in range(EPOCHS):
        for start in range(0, N, BATCH):
            steps["step"].append(step)
            steps["epoch"].append(epoch)
            steps["lr"].append(0.1)
            steps["batch_size"].append(BATCH)
            for i in range(start, start + BATCH):
                loss = (i + 1) / N * (1.0 + 1.0 / (epoch + 1))
                visits["step"].append(step)
                visits["sample_id"].append(i)
                visits["loss"].append(loss)
                visits["grad_sq"].append([grad(i, 0, epoch), grad(i, 1, epoch)])
                visits["target"].append(i % 3)
                visits["pred"].append(i % 3 if i < N // 2 else (i + 1) % 3)
                visits["p_target"].append(float(np.exp(-loss)))
                visits["margin"].append(1.0 - loss)
                visits["input_sq"].append(input_sq(i))
            step += 1
    return write_trace(
        path,
        layers={"name": ["fc1", "fc2"], "n_params": [50, 50]},
        steps=steps,
        visits={k: np.asarray(v) for k, v in visits.items()},
    )


def _paper_world(i: int, layer: int, epoch: int) -> float:
    """Every claim true: easy samples load the output layer early, hard the input late."""
    value = 1.0 + i
    if i < 4:
        value *= (3.0 if layer == 1 else 1.0) * 0.5**epoch
    if i >= 36:
        value *= (3.0 if layer == 0 else 1.0) * 1.5**epoch
    return value


def _verdicts(path: Path) -> dict[str, str]:
    with open_trace(path) as trace:
        return {f.claim: f.verdict for f in findings(trace)}


def test_paper_world_supports_every_claim(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.h5", _paper_world)
    with open_trace(path) as trace:
        results = findings(trace)
        lines = headlines(trace, results)
    assert [f.claim for f in results] == list(CLAIMS)
    assert {f.claim: f.verdict for f in results} == dict.fromkeys(CLAIMS, "supported")
    easy = results[0].numbers
    assert easy["easy_share_output"] > easy["easy_share_input"]
    assert 3 <= len(lines) <= 4
    assert "easiest 10%" in lines[0]


def test_shares_match_hand_computation(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.h5", _paper_world)
    with open_trace(path) as trace:
        numbers = findings(trace)[0].numbers

    def layer_total(layer: int, ids: range, epochs: range = range(EPOCHS)) -> float:
        return sum(_paper_world(i, layer, e) for i in ids for e in epochs)

    expected = layer_total(1, range(4)) / layer_total(1, range(N))
    assert numbers["easy_share_output"] == pytest.approx(expected, rel=1e-5)
    # Early period = first 20% of the 10 steps = steps 0 and 1 = epoch 0.
    early = layer_total(1, range(4), range(1)) / layer_total(1, range(N), range(1))
    assert numbers["easy_share_output_early"] == pytest.approx(early, rel=1e-5)


def test_reversed_world_is_not_supported(tmp_path: Path) -> None:
    def reversed_world(i: int, layer: int, epoch: int) -> float:
        value = 1.0 + i
        if i < 4:
            value *= (3.0 if layer == 0 else 1.0) * 1.5**epoch
        if i >= 36:
            value *= (3.0 if layer == 1 else 1.0) * 0.5**epoch
        return value

    verdicts = _verdicts(_write(tmp_path / "t.h5", reversed_world))
    assert verdicts["easy_output"] == "not supported"
    assert verdicts["hard_input"] == "not supported"
    assert verdicts["easy_early_hard_late"] == "not supported"


def test_hard_input_explained_by_input_norm_is_raw_sums_only(tmp_path: Path) -> None:
    # The hard decile's inputs are 4x larger; its input-layer gradient is larger by exactly
    # (input_sq + 1), as for a linear layer, and nothing else sets it apart.
    def sq(i: int) -> float:
        return 7.0 if i >= 36 else 1.0

    def grad(i: int, layer: int, epoch: int) -> float:
        value = 1.0 + i
        return value * ((sq(i) + 1.0) / 2.0 if layer == 0 else 1.0)

    path = _write(tmp_path / "t.h5", grad, sq)
    with open_trace(path) as trace:
        result = {f.claim: f for f in findings(trace)}["hard_input"]
    assert result.verdict == "raw sums only"
    assert result.controls["input_norm"] is False
    assert result.numbers["hard_over_easy_input_sq"] == pytest.approx(7.0)


def test_importance_unrelated_to_loss_is_not_supported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = rng.uniform(1, 2, size=(N, 2, EPOCHS))
    path = _write(tmp_path / "t.h5", lambda i, layer, e: float(noise[(i * 7) % N, layer, e]))
    with open_trace(path) as trace:
        result = {f.claim: f for f in findings(trace)}["importance_tracks_loss"]
    assert result.verdict == "not supported"


def test_too_few_samples_is_inconclusive(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.h5",
        layers=["fc1", "fc2"],
        steps={"step": [0], "epoch": [0], "lr": [0.1], "batch_size": [2]},
        visits={
            "step": [0, 0],
            "sample_id": [0, 1],
            "loss": [0.1, 0.9],
            "grad_sq": [[1.0, 2.0], [3.0, 4.0]],
            "target": [0, 1],
            "pred": [0, 0],
            "p_target": [0.9, 0.4],
            "margin": [1.0, -1.0],
        },
    )
    with open_trace(path) as trace:
        results = findings(trace)
        lines = headlines(trace, results)
    assert {f.verdict for f in results} == {"inconclusive"}
    assert lines
    assert "at least" in lines[0]
    frame = findings_frame(results)
    assert frame.columns[:2] == ["claim", "verdict"]
    assert set(frame["verdict"]) <= set(VERDICTS)
