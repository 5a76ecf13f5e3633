"""Shared report fixtures: one short demo run per session, and a trace without outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers next to this file (pdfcheck, reporttraces) import by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporttraces import write_no_outputs_trace

from samplescope.experiments.demo import DemoResult, run_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """A short demo (2 epochs): trace.h5 with outputs and thumbnails, and its report.pdf."""
    return run_demo(tmp_path_factory.mktemp("demo"), epochs=2, seed=0, progress=False)


@pytest.fixture(scope="session")
def no_outputs_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_no_outputs_trace(tmp_path_factory.mktemp("plain") / "plain.h5")
