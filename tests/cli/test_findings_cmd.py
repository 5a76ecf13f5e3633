"""`samplescope findings`: one run, several seeds, difficulty from another run."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from findingsworlds import write_world

from samplescope.analysis.findings import CLAIMS
from samplescope.cli import main


def _rows(*args: str) -> list[dict[str, str]]:
    result = CliRunner().invoke(main, ["findings", *args, "--format", "csv"])
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_one_run(tmp_path: Path) -> None:
    rows = _rows(str(write_world(tmp_path / "a.h5", 0)))
    assert [r["claim"] for r in rows] == list(CLAIMS)
    assert list(rows[0])[:7] == [
        "claim",
        "verdict",
        "effect",
        "ci_low",
        "ci_high",
        "min_effect",
        "per_param",
    ]
    assert {r["verdict"] for r in rows} == {"supported"}
    assert all(float(r["ci_low"]) > float(r["min_effect"]) for r in rows)


def test_several_seeds_and_difficulty_from(tmp_path: Path) -> None:
    paths = [str(write_world(tmp_path / f"s{i}.h5", i, data_seed=0)) for i in range(3)]
    other = str(write_world(tmp_path / "other.h5", 9, data_seed=0))
    rows = _rows(*paths, "--difficulty-from", other)
    assert [r["run"] for r in rows] == [r for r in ("0", "1", "2", "pooled") for _ in CLAIMS]
    pooled = [r for r in rows if r["run"] == "pooled"]
    assert {r["verdict"] for r in pooled} == {"supported"}
    assert {r["agreement"] for r in pooled} == {"1.0"}
    assert {r["difficulty"] for r in rows} == {f"final loss in {other}"}


def test_difficulty_from_other_data_is_one_line(tmp_path: Path) -> None:
    path = str(write_world(tmp_path / "a.h5", 0))
    other = str(write_world(tmp_path / "b.h5", 1, sample_offset=10_000))
    result = CliRunner().invoke(main, ["findings", path, "--difficulty-from", other])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: the difficulty run {other} shares only 0 of this run's 200 samples; take "
        "difficulty from a run of the same data\n"
    )
