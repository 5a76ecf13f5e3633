"""`samplescope train --no-record`: the same run without a trace, for the recorder's cost."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from samplescope.cli import main

SMALL = ["--dataset", "digits", "--epochs", "1", "--hidden", "16", "--subset", "100"]


@pytest.mark.slow
def test_no_record_trains_and_writes_no_trace(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", *SMALL, "--no-record", "--format", "csv"])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(io.StringIO(result.stdout)))
    assert row["trace"] == ""
    assert float(row["seconds"]) > 0
    assert float(row["test_accuracy"]) > 0
    assert list(tmp_path.iterdir()) == []


def test_no_record_with_out_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    result = CliRunner().invoke(main, ["train", *SMALL, "--no-record", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output == "Error: --no-record writes no trace: drop --out (or drop --no-record)\n"
    assert not out.exists()


def test_out_is_required_when_recording() -> None:
    result = CliRunner().invoke(main, ["train", *SMALL])
    assert result.exit_code == 2
    assert result.output == (
        "Error: --out is required (the trace to write), or pass --no-record to train without one\n"
    )
