"""train, findings, flag and every `experiment` command on digits, at small settings."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from samplescope.analysis.findings import CLAIMS, VERDICTS
from samplescope.cli import main

pytestmark = pytest.mark.slow

SMALL = [
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--hidden",
    "32",
    "--batch-size",
    "50",
    "--subset",
    "200",
]


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "run.h5"
    rows = _csv(_run("train", *SMALL, "--out", str(path), "--format", "csv"))
    assert rows[0]["trace"] == str(path)
    assert float(rows[0]["test_accuracy"]) > 0.1
    return path


def test_findings_command(trace: Path) -> None:
    rows = _csv(_run("findings", str(trace), "--format", "csv"))
    assert [r["claim"] for r in rows] == list(CLAIMS)
    assert {r["verdict"] for r in rows} <= set(VERDICTS)
    lines = _run("findings", str(trace), "--headlines", "--format", "csv").splitlines()
    assert lines[0] == "headline"
    # Two epochs are too short for a verdict: one line says why.
    assert lines[1].startswith("Inconclusive: the trace covers 2 epoch(s)")


def test_flag_command(trace: Path) -> None:
    rows = _csv(
        _run("flag", str(trace), "--kind", "redundant", "--budget", "20", "--format", "csv")
    )
    assert len(rows) == 200
    assert [r["rank"] for r in rows[:3]] == ["0", "1", "2"]
    assert sum(r["flagged"] == "true" for r in rows) == 20


def test_flag_bad_budget_is_one_line(trace: Path) -> None:
    result = CliRunner().invoke(main, ["flag", str(trace), "--budget", "lots"])
    assert result.exit_code == 2
    assert result.output == (
        "Error: --budget must be a fraction like 0.1 or a count like 50, not 'lots'\n"
    )


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.h5"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: fashion-mnist IDX files not found in")
    assert len(result.output.splitlines()) == 1


def test_experiment_findings(tmp_path: Path) -> None:
    rows = _csv(
        _run("experiment", "findings", *SMALL, "--out-dir", str(tmp_path), "--format", "csv")
    )
    assert [r["claim"] for r in rows] == list(CLAIMS)
    assert (tmp_path / "findings.csv").exists()
    assert (tmp_path / "findings_numbers.csv").exists()


def test_experiment_batches(tmp_path: Path) -> None:
    rows = _csv(
        _run(
            "experiment",
            "batches",
            *SMALL,
            "--seeds",
            "2",
            "--out-dir",
            str(tmp_path),
            "--format",
            "csv",
        )
    )
    assert [r["strategy"] for r in rows] == [
        "shuffle",
        "rand",
        "nlo",
        "rnlo",
        "nlm",
        "sio",
        "rsio",
        "sim",
        "online-loss",
        "online-importance",
    ]
    assert all(r["seeds"] == "2" for r in rows)
    assert (tmp_path / "batches.pdf").read_bytes().startswith(b"%PDF")
    assert len(_csv((tmp_path / "batches_epochs.csv").read_text())) == 10 * 2 * 2


def test_experiment_noise(tmp_path: Path) -> None:
    rows = _csv(
        _run(
            "experiment",
            "noise",
            *SMALL,
            "--noise",
            "0.2",
            "--out-dir",
            str(tmp_path),
            "--format",
            "csv",
        )
    )
    scores = {r["score"] for r in rows}
    assert {
        "importance",
        "importance_late",
        "importance_layer0",
        "final_loss",
        "aum",
        "forgetting",
        "confidence",
        "el2n",
        "tracin_self",
    } <= scores
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)
    assert all(float(r["base_rate"]) == pytest.approx(0.2) for r in rows)
    # A label flipped on purpose is the easiest thing for final loss to find.
    by_score = {r["score"]: float(r["auroc"]) for r in rows}
    assert by_score["final_loss"] > 0.6


def test_experiment_prune(tmp_path: Path) -> None:
    rows = _csv(
        _run(
            "experiment",
            "prune",
            *SMALL,
            "--keep",
            "0.5",
            "--scores",
            "random,importance,el2n",
            "--out-dir",
            str(tmp_path),
            "--format",
            "csv",
        )
    )
    assert [(r["keep"], r["score"]) for r in rows] == [
        ("1.0", "all"),
        ("0.5", "random"),
        ("0.5", "importance"),
        ("0.5", "el2n"),
    ]


def test_experiment_prune_unknown_score(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["experiment", "prune", *SMALL, "--scores", "magic", "--out-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: unknown scores magic;")


def test_explicit_options_win_over_the_preset(tmp_path: Path) -> None:
    from samplescope.analysis import open_trace

    out = tmp_path / "p.h5"
    _run(
        "train",
        "--dataset",
        "digits",
        "--preset",
        "paper",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--hidden",
        "16",
        "--out",
        str(out),
    )
    with open_trace(out) as t:
        config = t.meta["config"]
    assert config["lr"] == 0.05  # given on the command line
    assert config["hidden"] == 16
    assert config["batch_size"] == 100  # from the preset
    assert config["weight_decay"] == 1e-5
    assert config["epochs"] == 1


def test_existing_trace_names_the_cli_flag(trace: Path) -> None:
    result = CliRunner().invoke(main, ["train", *SMALL, "--out", str(trace)])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: trace {trace} already exists; choose another --out or pass --overwrite\n"
    )
    assert "overwrite=True" not in result.output


def test_unusable_device_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["train", *SMALL, "--out", str(tmp_path / "d.h5"), "--device", "nonsense"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: --device 'nonsense' is not usable here:")
    assert len(result.output.splitlines()) == 1
    assert not (tmp_path / "d.h5").exists()


def test_trace_stores_the_class_names(trace: Path) -> None:
    from samplescope.analysis import open_trace

    with open_trace(trace) as t:
        assert t.class_names == [str(i) for i in range(10)]


def test_train_progress_counts_batches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from samplescope.experiments.data import load_dataset
    from samplescope.experiments.train import RunConfig, train_run

    data = load_dataset("digits")
    config = RunConfig(dataset="digits", model="mlp", epochs=2, batch_size=500, hidden=8, depth=1)
    train_run(config, None, data=data, progress=True)
    err = capsys.readouterr().err
    # 1,437 samples in batches of 500: 3 a epoch, 6 in all, counted batch by batch.
    assert "/6 [" in err
    assert "batch" in err
    train_run(config, None, data=data, progress=False)
    assert capsys.readouterr().err == ""
