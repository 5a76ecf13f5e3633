"""The paper's findings on a named dataset: one recorded run, then `analysis.findings`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from samplescope.experiments.config import RunConfig
from samplescope.experiments.train import train_run

__all__ = ["FindingsRun", "run_findings"]


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
    config: RunConfig,
    out_dir: str | Path,
    *,
    time_plain: bool = False,
    seed: int = 0,
    difficulty_from: str | Path | None = None,
) -> FindingsRun:
    """Train ``config`` with recording, check the paper's claims, write findings.csv.

    With ``config.seeds`` above 1, one run per seed (``seed``, ``seed + 1``, ...) is
    recorded and the table holds each run's verdicts and the pooled ones
    (`analysis.findings.findings_runs`).

    Args:
        config: dataset, model and small settings.
        out_dir: where ``findings.h5`` (``findings_seed<k>.h5`` with several seeds),
            ``findings.csv``, ``findings_numbers.csv``, ``headlines.txt`` and ``run.json``
            (timings, test accuracy per epoch) go.
        time_plain: also train once without recording, to report the recorder's cost.
        seed: the (first) run's seed.
        difficulty_from: another run whose final loss defines easy and hard.
    """
    from samplescope.analysis import open_trace
    from samplescope.analysis.findings import findings, findings_frame, findings_runs, headlines

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config.load()
    ids = config.train_ids(data)
    seeds = [seed + k for k in range(config.seeds)]
    paths = (
        [out / "findings.h5"] if len(seeds) == 1 else [out / f"findings_seed{s}.h5" for s in seeds]
    )
    recorded = [
        train_run(
            config.with_seed(s),
            path,
            data=data,
            train_indices=ids,
            thumbnails=False,
            overwrite=True,
            progress=False,
        )
        for s, path in zip(seeds, paths, strict=True)
    ]
    plain = (
        train_run(config.with_seed(seed), None, data=data, train_indices=ids, progress=False)
        if time_plain
        else None
    )
    traces = [open_trace(p) for p in paths]
    try:
        if len(traces) == 1:
            results = findings(traces[0], difficulty_from=difficulty_from)
        else:
            results = findings_runs(traces, difficulty_from=difficulty_from)
        lines = headlines(traces[0], results)
    finally:
        for trace in traces:
            trace.close()
    table = findings_frame(results)
    numbers = pl.DataFrame(
        [
            {"run": f.run, "claim": f.claim, "name": k, "value": float(v)}
            for f in results
            for k, v in f.numbers.items()
        ],
        schema={"run": pl.String, "claim": pl.String, "name": pl.String, "value": pl.Float64},
    )
    table.write_csv(out / "findings.csv")
    numbers.write_csv(out / "findings_numbers.csv")
    (out / "headlines.txt").write_text("\n".join(lines) + "\n")
    first = recorded[0]
    timing = {
        "setting": config.describe(),
        "recorded_seconds": first.seconds,
        "plain_seconds": None if plain is None else plain.seconds,
        "test_accuracy": first.test_accuracy,
        "test_accuracy_per_seed": [r.test_accuracy[-1] for r in recorded if r.test_accuracy],
    }
    (out / "run.json").write_text(json.dumps(timing, indent=1) + "\n")
    return FindingsRun(
        paths[0],
        table,
        numbers,
        lines,
        first.seconds,
        None if plain is None else plain.seconds,
        first.test_accuracy[-1] if first.test_accuracy else float("nan"),
    )
