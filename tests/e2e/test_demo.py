"""The main job end to end: `samplescope demo` trains, records, reports and explains."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pypdf import PdfReader

from samplescope.cli import main


@pytest.mark.slow
def test_demo_writes_trace_report_and_headlines(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Trained an MLP (3×512 ReLU) on digits (1,437 train / 360 test")
    assert lines[1].startswith(f"Trace:  {out / 'trace.h5'} (")
    assert lines[2].startswith(f"Report: {out / 'report.pdf'} (made in ")
    assert lines[3] == "Findings:"
    findings = [line for line in lines if line.startswith("  - ")]
    assert 1 <= len(findings) <= 4
    assert (out / "trace.h5").stat().st_size > 0
    # One page per section it supports, plus the candidates' gallery and trajectories.
    assert len(PdfReader(out / "report.pdf").pages) == 11
