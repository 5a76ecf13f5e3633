"""`samplescope push` and `samplescope.push`: TensorBoard event files read back with
TensorBoard's own reader and checked against SQL on the trace; one-line errors for a
missing logger package or an unusable log directory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import write_tiny_trace, write_trace

from samplescope.analysis import open_trace
from samplescope.cli import main
from samplescope.push import PushError, push_mlflow, push_tensorboard, push_wandb

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is in the test extra",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_trace(tmp_path_factory.mktemp("push") / "tiny.h5")


def _read(path: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _expected_scalars(trace_path: Path) -> dict[str, dict[int, float]]:
    """Every scalar the pusher should send, computed here by plain SQL on the trace."""
    with open_trace(trace_path) as t:
        per_layer = t.query(
            "SELECT layer, epoch + 1 AS step, sum(importance) AS total, "
            "avg(importance) AS mean FROM importance GROUP BY ALL"
        )
        per_decile = t.query(
            "WITH c AS (SELECT i.layer, i.epoch + 1 AS step, s.difficulty_decile AS d, "
            "sum(i.importance) AS imp FROM importance i JOIN samples s USING (sample_id) "
            "GROUP BY ALL) "
            "SELECT layer, step, d, imp / sum(imp) OVER (PARTITION BY layer, step) FROM c"
        )
    expected: dict[str, dict[int, float]] = {}
    for layer, step, total, mean in per_layer.rows():
        expected.setdefault(f"importance/{layer}", {})[step] = total
        expected.setdefault(f"importance_mean/{layer}", {})[step] = mean
    for layer, step, decile, share in per_decile.rows():
        expected.setdefault(f"decile_share/{layer}/d{decile}", {})[step] = share
    return expected


def test_tensorboard_scalars_read_back_exactly(tiny: Path, tmp_path: Path) -> None:
    with open_trace(tiny) as t:
        path = push_tensorboard(t, tmp_path / "tb")
    assert path.parent == tmp_path / "tb"
    acc = _read(path)
    expected = _expected_scalars(tiny)
    # Only these summaries go out: no per-sample or per-visit tag.
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        # TensorBoard stores scalars as float32; the value must be that rounding exactly.
        assert got == {step: float(np.float32(v)) for step, v in by_step.items()}, tag
    assert {e.step for e in acc.Scalars("importance/enc")} == {1, 2}


def test_tensorboard_top_tables_are_text(tiny: Path, tmp_path: Path) -> None:
    with open_trace(tiny) as t:
        path = push_tensorboard(t, tmp_path / "tb", top_k=2)
        top = t.query(
            "SELECT sample_id, target FROM samples ORDER BY importance DESC, sample_id LIMIT 2"
        )
    acc = _read(path)
    assert "top/importance" in acc.Tags()["tensors"]
    (event,) = acc.Tensors("top/importance")
    assert event.step == 2  # the last epoch, 1-based
    assert acc.summary_metadata["top/importance"].plugin_data.plugin_name == "text"
    lines = event.tensor_proto.string_val[0].decode().splitlines()
    assert lines[0] == "| rank | sample_id | target | value |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [(int(r[1]), int(r[2])) for r in rows] == top.rows()
    assert [r[0] for r in rows] == ["0", "1"]


def test_cli_push_tensorboard(tiny: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["push", str(tiny), "--to", "tensorboard", "--logdir", str(tmp_path / "tb")]
    )
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "tb").iterdir()
    assert result.output == f"Wrote {written}\n"
    assert _read(written).Tags()["scalars"]


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_cli_logdir_is_a_file(tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(
        main, ["push", str(tiny), "--to", "tensorboard", "--logdir", str(target)]
    )
    assert "is a file, not a directory" in _error_line(result)
    assert target.read_text() == "x"


def test_cli_logdir_under_a_file(tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(
        main, ["push", str(tiny), "--to", "tensorboard", "--logdir", str(target / "tb")]
    )
    assert "cannot create the log directory" in _error_line(result)


def test_cli_empty_trace_leaves_no_logdir(tmp_path: Path) -> None:
    empty = write_trace(
        tmp_path / "empty.h5",
        layers=["a"],
        steps={"step": [], "epoch": [], "lr": [], "batch_size": []},
        visits={"step": [], "sample_id": [], "loss": [], "grad_sq": np.zeros((0, 1))},
        closed=False,
    )
    result = CliRunner().invoke(
        main, ["push", str(empty), "--to", "tensorboard", "--logdir", str(tmp_path / "tb")]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Error: " in result.output
    assert "no recorded visits" in result.output
    assert not (tmp_path / "tb").exists()


def test_cli_tensorboard_needs_logdir(tiny: Path) -> None:
    result = CliRunner().invoke(main, ["push", str(tiny), "--to", "tensorboard"])
    assert _error_line(result) == (
        "Error: pushing to tensorboard needs a log directory (--logdir DIR)"
    )


def test_cli_missing_trace(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["push", str(tmp_path / "no.h5"), "--to", "tensorboard", "--logdir", "tb"]
    )
    assert "no.h5" in _error_line(result)


@pytest.mark.parametrize("package", ["tensorboard", "wandb", "mlflow"])
def test_cli_missing_package(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    # A None entry in sys.modules makes `import package` raise ImportError.
    monkeypatch.setitem(sys.modules, package, None)
    result = CliRunner().invoke(
        main, ["push", str(tiny), "--to", package, "--logdir", str(tmp_path / "tb")]
    )
    assert _error_line(result) == (
        f"Error: pushing to {package} needs the '{package}' package: "
        f"pip install 'samplescope[{package}]'"
    )
    assert not (tmp_path / "tb").exists()


def test_api_missing_package(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with open_trace(tiny) as t:
        with pytest.raises(PushError, match=r"samplescope\[wandb\]"):
            push_wandb(t)
        with pytest.raises(PushError, match=r"samplescope\[mlflow\]"):
            push_mlflow(t)


class _Recorder:
    """Stands in for a logger module: records calls (the real packages are not installed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self

        return call


def test_wandb_and_mlflow_get_the_same_scalars(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Checks what our pushers send, through stand-ins; not the packages' own behaviour.
    expected = {
        (tag, step): v
        for tag, by_step in _expected_scalars(tiny).items()
        for step, v in by_step.items()
    }
    wandb, mlflow = _Recorder(), _Recorder()
    wandb.run = None
    mlflow.active_run = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    with open_trace(tiny) as t:
        push_wandb(t, top_k=3)
        push_mlflow(t, top_k=3)
    logged = {}
    for name, args, _ in wandb.calls:
        if name == "log" and "samplescope/epoch" in args[0]:
            step = args[0]["samplescope/epoch"]
            logged.update({(k, step): v for k, v in args[0].items() if k != "samplescope/epoch"})
    assert logged == pytest.approx(expected)
    tables = [args[0] for name, args, _ in wandb.calls if name == "log" and "top/aum" in args[0]]
    assert len(tables) == 1
    metrics = {
        (args[0], kwargs["step"]): args[1]
        for name, args, kwargs in mlflow.calls
        if name == "log_metric"
    }
    assert metrics == pytest.approx(expected)
    names = [name for name, _, _ in mlflow.calls]
    assert names[0] == "start_run"
    assert names[-1] == "end_run"
    artifacts = [kw["artifact_file"] for name, _, kw in mlflow.calls if name == "log_table"]
    assert "samplescope/top_importance.json" in artifacts
