"""`samplescope demo`: a thin skin over `samplescope.experiments.demo`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the demo command to `group` (the root `samplescope` group)."""
    group.add_command(demo)


@click.command()
@click.option(
    "--out",
    "out",
    default="samplescope-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for trace.h5 and report.pdf.",
)
@click.option(
    "--epochs", type=int, default=None, help="Training epochs [default: 50, the paper's protocol]."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for the initialisation and batch order (the train/test split is fixed).",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress bars (there are none when stderr is not a terminal).",
)
def demo(out: Path, epochs: int | None, seed: int, quiet: bool) -> None:
    """Train the paper's MLP (3 hidden ReLU layers of 512) on scikit-learn's handwritten
    digits with plain SGD, record every sample at every step, write trace.h5 and
    report.pdf, and print the headline findings. Under two minutes on 2 CPU cores; no
    download.

    Example: samplescope demo --out samplescope-demo/
    """
    from samplescope.experiments.demo import DEFAULT_EPOCHS, run_demo

    result = run_demo(
        out,
        DEFAULT_EPOCHS if epochs is None else epochs,
        seed,
        progress=not quiet and sys.stderr.isatty(),
    )
    size = result.trace.stat().st_size / 1e6
    click.echo(
        f"Trained an MLP (3×512 ReLU) on digits ({result.n_train:,} train / "
        f"{result.n_test:,} test images) for {result.epochs} epochs in "
        f"{result.train_seconds:.1f} s: train accuracy {result.train_accuracy:.1%}, "
        f"test accuracy {result.test_accuracy:.1%}."
    )
    click.echo(f"Trace:  {result.trace} ({size:.1f} MB)")
    click.echo(f"Report: {result.report} (made in {result.report_seconds:.1f} s)")
    if result.headlines:
        click.echo("Findings:")
        for line in result.headlines:
            click.echo(f"  - {line}")
    click.echo(f"Next: samplescope samples {result.trace} --sort importance --top 10")
