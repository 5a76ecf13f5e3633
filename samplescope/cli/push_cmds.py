"""`samplescope push`: a thin skin over `samplescope.push`."""

from __future__ import annotations

from pathlib import Path

import click

from samplescope.cli.output import warn_about

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the push command to `group` (the root `samplescope` group)."""
    group.add_command(push)


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["tensorboard", "wandb", "mlflow"]),
    help="The logger: tensorboard (event files, offline), wandb or mlflow (where installed).",
)
@click.option(
    "--logdir",
    type=click.Path(path_type=Path),
    default=None,
    help="TensorBoard log directory (created if missing); needed with --to tensorboard.",
)
@click.option("--project", default=None, help="W&B project of a new run (--to wandb).")
@click.option(
    "--top",
    "top_k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Rows of each top-k table.",
)
def push(
    trace: tuple[str, ...], to: str, logdir: Path | None, project: str | None, top_k: int
) -> None:
    """Push a trace's per-epoch summaries to an experiment logger: per-layer importance,
    difficulty-decile shares and top-k sample tables, with the 1-based epoch as step.
    Per-sample streams are never pushed; query the trace for those.

    TRACE is one .h5 file, several shard files of one run, or a quoted glob.

    \b
    Example: samplescope push run.h5 --to tensorboard --logdir tb/run1
             tensorboard --logdir tb
    """
    from samplescope.analysis import open_trace
    from samplescope.push import push as push_summaries

    source = trace[0] if len(trace) == 1 else list(trace)
    with open_trace(source) as opened:
        warn_about(opened)
        click.echo(push_summaries(opened, to, logdir=logdir, project=project, top_k=top_k))
