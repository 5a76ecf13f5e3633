"""The main job: train the paper's MLP on scikit-learn's digits, record it, report it.

`run_demo` is what `samplescope demo` (and `make demo`) runs: plain SGD on the embedded
digits data with a held-out test split, every sample recorded at every step with thumbnails,
then the PDF report and three or four headline findings in plain words.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from samplescope._paths import ensure_writable_dir
from samplescope.errors import SamplescopeError
from samplescope.experiments.config import RunConfig
from samplescope.experiments.train import train_run

__all__ = ["DEFAULT_EPOCHS", "DemoError", "DemoResult", "run_demo"]

# The paper's 50 epochs: enough for the MLP to fit the digits training set (train accuracy
# near 100%), so that "hard" means hard and not merely "not reached yet".
DEFAULT_EPOCHS = 50


class DemoError(SamplescopeError):
    """The demo cannot run with the given options (e.g. an unwritable output folder)."""


@dataclass
class DemoResult:
    """Where the demo wrote its files and what it found.

    Attributes:
        out_dir: the output folder.
        trace: the recorded trace (``trace.h5``).
        report: the PDF report (``report.pdf``).
        headlines: three or four findings in plain words.
        test_accuracy: held-out accuracy after the last epoch, in [0, 1].
        train_accuracy: training accuracy during the last epoch, in [0, 1].
        n_train, n_test: sizes of the two splits.
        train_seconds, report_seconds: wall time of training (with recording) and of the
            report.
    """

    out_dir: Path
    trace: Path
    report: Path
    headlines: list[str] = field(default_factory=list)
    test_accuracy: float = float("nan")
    train_accuracy: float = float("nan")
    n_train: int = 0
    n_test: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    report_seconds: float = 0.0


def run_demo(
    out_dir: str | os.PathLike[str] = "samplescope-demo",
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    *,
    progress: bool = True,
) -> DemoResult:
    """Train, record and report the demo run into `out_dir`.

    Args:
        out_dir: folder for ``trace.h5`` and ``report.pdf`` (created; files overwritten).
        epochs: training epochs (the paper's protocol uses 50).
        seed: seeds the initialisation and the batch order (the split is fixed).
        progress: show progress bars for training and for the report.

    Returns:
        A `DemoResult` with the paths, the headline findings and timings.

    Raises:
        DemoError: `epochs` is below 1, or `out_dir` cannot be created or written.
    """
    from samplescope.experiments.data import load_dataset
    from samplescope.reports import render_report
    from samplescope.reports.findings import run_findings

    if epochs < 1:
        msg = f"--epochs must be at least 1, got {epochs}"
        raise DemoError(msg)
    out = _prepare(Path(out_dir))
    data = load_dataset("digits", seed=seed)
    config = RunConfig.paper(dataset="digits", epochs=epochs, seed=seed)
    trace_path = out / "trace.h5"
    run = train_run(
        config, trace_path, data=data, thumbnails=True, overwrite=True, progress=progress
    )
    result = DemoResult(
        out_dir=out,
        trace=trace_path,
        report=out / "report.pdf",
        test_accuracy=run.test_accuracy[-1],
        train_accuracy=run.train_accuracy[-1],
        n_train=len(data.y_train),
        n_test=len(data.y_test),
        epochs=epochs,
        train_seconds=run.seconds,
    )
    from samplescope.analysis import open_trace

    start = time.perf_counter()
    with open_trace(trace_path) as trace:
        title = f"samplescope demo: MLP 3×512 on digits, {epochs} epochs, seed {seed}"
        render_report(trace, result.report, title=title, progress=progress)
        result.headlines = run_findings(trace)[1]
    result.report_seconds = time.perf_counter() - start
    return result


def _prepare(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        msg = f"{out} is a file; give a folder for the demo's trace.h5 and report.pdf"
        raise DemoError(msg)
    ensure_writable_dir(out, DemoError)
    return out
