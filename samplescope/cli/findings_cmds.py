"""`samplescope findings | flag`: thin skins over `samplescope.analysis.findings` and
`samplescope.analysis.flags`."""

from __future__ import annotations

import math

import click
import polars as pl

from samplescope.analysis.flags import KINDS
from samplescope.cli.output import frame_output, warn_about
from samplescope.errors import SamplescopeError

__all__ = ["register"]


class _BadOptionError(SamplescopeError):
    """A malformed option value."""


def register(group: click.Group) -> None:
    """Add findings and flag to `group` (the root `samplescope` group)."""
    for command in (findings, flag):
        group.add_command(command)


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option("--headlines", is_flag=True, help="Print the plain-language summary instead.")
@click.option(
    "--difficulty-from",
    "difficulty_from",
    type=click.Path(dir_okay=False),
    default=None,
    help="Take easy and hard from this other run's final loss (another seed of the same "
    "data), so difficulty is not measured on the run whose importance is tested.",
)
@frame_output
def findings(trace: tuple[str, ...], headlines: bool, difficulty_from: str | None) -> pl.DataFrame:
    """Check the paper's claims on a run, each with a 90% interval and its controls.

    Verdicts: supported (the interval clears the claim's minimum effect, raw and under every
    control), raw sums only (a control's does not), not supported, inconclusive (too short,
    not converged, still open, a partial last epoch, too few samples). Several runs of the
    same data (traces with different run ids; shards of one run are joined) give each run's
    verdicts, then pooled ones with the fraction of runs that agree.

    Example: samplescope findings s0.h5 s1.h5 s2.h5 --difficulty-from other.h5 --format csv
    """
    from contextlib import ExitStack

    from samplescope.analysis import open_trace
    from samplescope.analysis.findings import findings as check
    from samplescope.analysis.findings import findings_frame, findings_runs, group_runs
    from samplescope.analysis.findings import headlines as summarise

    runs = group_runs(trace)
    with ExitStack() as stack:
        opened = [stack.enter_context(open_trace(paths)) for paths in runs]
        for each in opened:
            warn_about(each)
        if len(opened) == 1:
            results = check(opened[0], difficulty_from=difficulty_from)
        else:
            results = findings_runs(opened, difficulty_from=difficulty_from)
        if headlines:
            return pl.DataFrame({"headline": summarise(opened[0], results)})
        return findings_frame(results)


def _budget(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        msg = f"--budget must be a fraction like 0.1 or a count like 50, not {text!r}"
        raise _BadOptionError(msg) from None
    if not math.isfinite(value) or value <= 0:
        msg = f"--budget must be a fraction in (0, 1] or a count >= 1, not {text!r}"
        raise _BadOptionError(msg)
    return int(value) if value > 1 and value == int(value) else value


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="mislabeled",
    show_default=True,
)
@click.option(
    "--budget",
    default="0.1",
    show_default=True,
    help="How many to flag: a fraction (0.1) or a count (50).",
)
@click.option(
    "--score",
    default=None,
    help="Rank by this score [default: confidence for mislabeled, importance for redundant].",
)
@click.option("--top", type=click.IntRange(min=0), default=None, help="Print the first N rows.")
@frame_output
def flag(
    trace: tuple[str, ...], kind: str, budget: str, score: str | None, top: int | None
) -> pl.DataFrame:
    """Rank samples by how likely they are mislabeled or redundant; flag the budget's worth.

    Lower label_quality / informativeness = flagged first (cleanlab's direction).

    Example: samplescope flag run.h5 --kind mislabeled --budget 0.05 --top 20
    """
    from samplescope.analysis import open_trace
    from samplescope.analysis.flags import flag as rank

    with open_trace(list(trace)) as opened:
        warn_about(opened)
        frame = rank(opened, kind=kind, budget=_budget(budget), score=score)
    return frame if top is None else frame.head(top)
