"""Layering: recorder never imports analysis; analysis and reports never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module",
    [
        "samplescope",
        "samplescope.analysis",
        "samplescope.analysis.findings",
        "samplescope.analysis.flags",
        "samplescope.reports",
        "samplescope.reports.render",
    ],
)
def test_torch_free_packages(module):
    loaded = _modules_after_import(module)
    assert "torch" not in loaded


def test_recorder_never_imports_analysis_or_reports():
    loaded = _modules_after_import("samplescope.recorder")
    assert "torch" in loaded
    assert not {m for m in loaded if m.startswith(("samplescope.analysis", "samplescope.reports"))}


def test_reports_reads_traces_only_through_analysis():
    loaded = _modules_after_import("samplescope.reports")
    assert "samplescope.analysis" in loaded


def test_reports_source_opens_no_trace_file_itself():
    root = Path(__file__).resolve().parents[1] / "reports"
    for source in root.rglob("*.py"):
        text = source.read_text()
        for banned in ("import h5py", "import duckdb", "import torch", "from torch"):
            assert banned not in text, f"{source.name} has {banned!r}"


def test_the_cli_starts_without_torch():
    # `samplescope info` must not pay torch's import time; training commands import it lazily.
    loaded = _modules_after_import("samplescope.cli")
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "module",
    ["samplescope", "samplescope.cli", "samplescope.recorder", "samplescope.recorder.integrations"],
)
def test_frameworks_are_imported_only_by_their_adapter(module):
    # transformers, lightning and accelerate are optional extras: only importing their
    # adapter module (samplescope.recorder.integrations.<name>) may load them.
    loaded = _modules_after_import(module)
    frameworks = {"transformers", "lightning", "pytorch_lightning", "accelerate"}
    assert not frameworks & loaded


def test_experiment_registries_import_without_torch():
    # The CLI builds its choices (datasets, models, presets) from here at startup.
    loaded = _modules_after_import("samplescope.experiments.config")
    assert "torch" not in loaded


def test_bench_imports_only_public_modules():
    root = Path(__file__).resolve().parents[1] / "bench"
    for source in root.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("samplescope"):
                    private = [p for p in name.split(".") if p.startswith("_")]
                    assert not private, f"{source.name} imports private {name}"
