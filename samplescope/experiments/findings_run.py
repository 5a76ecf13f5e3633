"""The paper's findings on a named dataset: one recorded run, then `analysis.findings`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from samplescope.experiments._common import Setting
from samplescope.experiments.train import train_run

__all__ = ["FindingsRun", "run_findings"]

logger = logging.getLogger(__name__)


@dataclass
class FindingsRun:
    """What `run_findings` produced."""

    trace: Path
    table: pl.DataFrame  # analysis.findings.findings_frame
    numbers: pl.DataFrame  # claim, name, value: every number behind the verdicts
    headlines: list[str]
    recorded_seconds: float
    plain_seconds: float | None
    test_accuracy: float


def run_findings(
    setting: Setting, out_dir: str | Path, *, time_plain: bool = False, seed: int = 0
) -> FindingsRun:
    """Train ``setting`` with recording, check the paper's claims, write findings.csv.

    Args:
        setting: dataset, model and small settings.
        out_dir: where ``findings.h5``, ``findings.csv``, ``findings_numbers.csv``,
            ``headlines.txt`` and ``run.json`` (timings, test accuracy per epoch) go.
        time_plain: also train once without recording, to report the recorder's cost.
        seed: the run's seed.
    """
    from samplescope.analysis import open_trace
    from samplescope.analysis.findings import findings, findings_frame, headlines

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = setting.load()
    ids = setting.train_ids(data)
    trace_path = out / "findings.h5"
    config = setting.config(seed)
    recorded = train_run(
        config,
        trace_path,
        data=data,
        train_indices=ids,
        thumbnails=False,
        overwrite=True,
        progress=False,
    )
    plain = (
        train_run(config, None, data=data, train_indices=ids, progress=False)
        if time_plain
        else None
    )
    with open_trace(trace_path) as trace:
        results = findings(trace)
        lines = headlines(trace, results)
    table = findings_frame(results)
    numbers = pl.DataFrame(
        [
            {"claim": f.claim, "name": k, "value": float(v)}
            for f in results
            for k, v in f.numbers.items()
        ],
        schema={"claim": pl.String, "name": pl.String, "value": pl.Float64},
    )
    table.write_csv(out / "findings.csv")
    numbers.write_csv(out / "findings_numbers.csv")
    (out / "headlines.txt").write_text("\n".join(lines) + "\n")
    timing = {
        "setting": setting.describe(),
        "recorded_seconds": recorded.seconds,
        "plain_seconds": None if plain is None else plain.seconds,
        "test_accuracy": recorded.test_accuracy,
    }
    (out / "run.json").write_text(json.dumps(timing, indent=1) + "\n")
    return FindingsRun(
        trace_path,
        table,
        numbers,
        lines,
        recorded.seconds,
        None if plain is None else plain.seconds,
        recorded.test_accuracy[-1] if recorded.test_accuracy else float("nan"),
    )
