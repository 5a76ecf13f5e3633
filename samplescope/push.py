"""Push a trace's per-epoch summaries to the experiment loggers people already use.

What goes out is `samplescope.analysis.summaries.epoch_summaries` and nothing else: per
(epoch, layer) importance, per (epoch, layer, difficulty decile) share of it, and the top-k
tables. Never a per-visit or per-sample stream — those stay in the trace, where SQL reaches
them; a logger would drown in them (a 50k-sample run is 50k points per step).

Each logger is imported lazily, so samplescope needs none of them; a missing one is a
`PushError` naming the extra to install. Steps are 1-based epochs (epoch 0 of the trace is
step 1), like the report's axes.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

from samplescope.analysis.summaries import DEFAULT_TOP_K, EpochSummaries, epoch_summaries
from samplescope.analysis.trace import Trace
from samplescope.errors import SamplescopeError

__all__ = [
    "EPOCH_BASE",
    "TARGETS",
    "PushError",
    "push",
    "push_mlflow",
    "push_tensorboard",
    "push_wandb",
    "scalars",
]

EPOCH_BASE = 1
_WANDB_STEP = "samplescope/epoch"
_EVENT_GLOB = "events.out.tfevents.*.samplescope"
TARGETS = ("tensorboard", "wandb", "mlflow")


class PushError(SamplescopeError):
    """A summary cannot be pushed: the logger is not installed, or its output is unwritable."""


def scalars(summaries: EpochSummaries) -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of every scalar a pusher sends, in epoch order.

    Tags: `importance/<layer>` (Σ over the epoch's visits), `importance_mean/<layer>`
    (mean per visit), `decile_share/<layer>/d<k>` (k = 0 easiest … 9 hardest).
    """
    for row in summaries.importance.iter_rows(named=True):
        step = row["epoch"] + EPOCH_BASE
        yield f"importance/{row['layer']}", step, float(row["importance"])
        yield f"importance_mean/{row['layer']}", step, float(row["importance_mean"])
    for row in summaries.decile_share.iter_rows(named=True):
        tag = f"decile_share/{row['layer']}/d{row['decile']}"
        yield tag, row["epoch"] + EPOCH_BASE, float(row["share"])


def _tables(summaries: EpochSummaries) -> Iterator[tuple[str, pl.DataFrame]]:
    """(score, its top-k rows: rank, sample_id, target, value) per score."""
    for (score,), frame in summaries.top.group_by("score", maintain_order=True):
        yield str(score), frame.drop("score")


def _markdown(frame: pl.DataFrame) -> str:
    """A Markdown table, which TensorBoard's text plugin renders."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _last_step(summaries: EpochSummaries) -> int:
    epochs = summaries.importance["epoch"]
    return int(epochs.max()) + EPOCH_BASE if len(epochs) else EPOCH_BASE


def _import(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"pushing to {extra} needs the {module!r} package: pip install 'samplescope[{extra}]'"
        raise PushError(msg) from None


def _writable_dir(logdir: Path) -> Path:
    if logdir.exists() and not logdir.is_dir():
        msg = f"the log directory {str(logdir)!r} is a file, not a directory"
        raise PushError(msg)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        msg = f"cannot create the log directory {str(logdir)!r}: {error.strerror or error}"
        raise PushError(msg) from None
    if not logdir.is_dir() or not os.access(logdir, os.W_OK | os.X_OK):
        msg = f"the log directory {str(logdir)!r} is not a writable directory"
        raise PushError(msg)
    return logdir


def push_tensorboard(trace: Trace, logdir: str | Path, *, top_k: int = DEFAULT_TOP_K) -> Path:
    """Write `trace`'s summaries as a TensorBoard event file in `logdir`, offline.

    Scalars per epoch (see `scalars`) and, at the last epoch's step, one text summary per
    top-k table (`top/<score>`, a Markdown table).

    Args:
        trace: an open trace.
        logdir: the run's log directory (created if missing); `tensorboard --logdir` it.
        top_k: rows of each top-k table.

    Returns:
        The event file written.

    Raises:
        PushError: `tensorboard` is not installed, or `logdir` is not writable.
    """
    _import("tensorboard", "tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    # Summaries first: a trace that cannot be summarised leaves no empty log directory.
    summaries = epoch_summaries(trace, top_k=top_k)
    directory = _writable_dir(Path(logdir))
    before = set(directory.glob(_EVENT_GLOB))
    writer = EventFileWriter(str(directory), filename_suffix=".samplescope")
    now = time.time()
    try:
        for tag, step, value in scalars(summaries):
            summary = summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)]
            )
            writer.add_event(event_pb2.Event(step=step, wall_time=now, summary=summary))
        last = _last_step(summaries)
        for score, frame in _tables(summaries):
            summary = text_pb(f"top/{score}", _markdown(frame))
            writer.add_event(event_pb2.Event(step=last, wall_time=now, summary=summary))
    finally:
        writer.close()
    # The writer names its file (time, host, pid, a counter) and keeps the name private.
    (path,) = set(directory.glob(_EVENT_GLOB)) - before
    return path


def push_wandb(trace: Trace, *, project: str | None = None, top_k: int = DEFAULT_TOP_K) -> None:
    """Log `trace`'s summaries to Weights & Biases: the active run, else a new one.

    Scalars per epoch against `samplescope/epoch` (the 1-based epoch), then the top-k
    tables (`top/<score>`) as `wandb.Table`s. Untested here (wandb is not a test dependency).

    Raises:
        PushError: `wandb` is not installed.
    """
    wandb = _import("wandb", "wandb")
    summaries = epoch_summaries(trace, top_k=top_k)
    run = wandb.run or wandb.init(project=project, job_type="samplescope")
    by_step: dict[int, dict[str, float]] = {}
    for tag, step, value in scalars(summaries):
        by_step.setdefault(step, {})[tag] = value
    # Our own step key and define_metric on our prefixes only: an active run's step counter
    # and its other metrics (maybe its own "epoch") are left as they are.
    for prefix in ("importance", "importance_mean", "decile_share"):
        run.define_metric(f"{prefix}/*", step_metric=_WANDB_STEP)
    for step in sorted(by_step):
        run.log({**by_step[step], _WANDB_STEP: step})
    tables = {
        f"top/{score}": wandb.Table(columns=frame.columns, data=frame.rows())
        for score, frame in _tables(summaries)
    }
    if tables:
        run.log(tables)


def push_mlflow(trace: Trace, *, top_k: int = DEFAULT_TOP_K) -> None:
    """Log `trace`'s summaries to MLflow: the active run, else a new one.

    Scalars as metrics with the epoch as step (`/` in tags kept: MLflow allows it), the
    top-k tables as `samplescope/top_<score>.json` table artifacts. Untested here (mlflow
    is not a test dependency).

    Raises:
        PushError: `mlflow` is not installed.
    """
    mlflow = _import("mlflow", "mlflow")
    summaries = epoch_summaries(trace, top_k=top_k)
    started = mlflow.active_run() is None
    if started:
        mlflow.start_run()
    try:
        for tag, step, value in scalars(summaries):
            mlflow.log_metric(tag, value, step=step)
        for score, frame in _tables(summaries):
            mlflow.log_table(
                data=frame.to_dict(as_series=False),
                artifact_file=f"samplescope/top_{score}.json",
            )
    finally:
        if started:
            mlflow.end_run()


def push(
    trace: Trace,
    to: str,
    *,
    logdir: str | Path | None = None,
    project: str | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> str:
    """Push to one of `TARGETS`; returns a sentence saying where it went.

    Raises:
        PushError: an unknown target, tensorboard without `logdir`, or a pusher's error.
    """
    if to == "tensorboard":
        if logdir is None:
            msg = "pushing to tensorboard needs a log directory (--logdir DIR)"
            raise PushError(msg)
        path = push_tensorboard(trace, logdir, top_k=top_k)
        return f"Wrote {path}"
    if to == "wandb":
        push_wandb(trace, project=project, top_k=top_k)
        return "Logged to Weights & Biases"
    if to == "mlflow":
        push_mlflow(trace, top_k=top_k)
        return "Logged to MLflow"
    msg = f"unknown push target {to!r}; choose one of {', '.join(TARGETS)}"
    raise PushError(msg)
