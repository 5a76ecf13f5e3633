"""`samplescope train | experiment ...`: thin skins over `samplescope.experiments`.

Each command parses its options, calls one function of `samplescope.experiments` or
`samplescope.analysis`, and prints a frame through the shared `--format` decorator.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import polars as pl

from samplescope.cli.output import CommandError, frame_output, one_line
from samplescope.errors import SamplescopeError
from samplescope.experiments.config import DATASETS, MODELS, PRESETS, RunConfig

__all__ = ["register"]

# The options' defaults are the config's.
_DEFAULT = RunConfig()


class _BadOptionError(SamplescopeError):
    """A malformed option value."""


def register(group: click.Group) -> None:
    """Add train and the experiment group to `group`."""
    for command in (train, experiment):
        group.add_command(command)


def _presets_help() -> str:
    """Each preset and what it sets, e.g. ``paper: model mlp, hidden 512, ...``."""
    return "; ".join(
        f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in values.items())
        for name, values in PRESETS.items()
    )


def _training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--dataset",
            type=click.Choice(DATASETS),
            default=_DEFAULT.dataset,
            show_default=True,
            help="Named dataset (read from disk, never downloaded).",
        ),
        click.option(
            "--model", type=click.Choice(MODELS), default=_DEFAULT.model, show_default=True
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=None,
            help=f"Epochs [default: {_DEFAULT.epochs}, or the preset's].",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=_DEFAULT.batch_size,
            show_default=True,
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=_DEFAULT.lr,
            show_default=True,
        ),
        click.option(
            "--hidden",
            type=click.IntRange(min=1),
            default=_DEFAULT.hidden,
            show_default=True,
            help="MLP hidden width.",
        ),
        click.option(
            "--depth",
            type=click.IntRange(min=1),
            default=_DEFAULT.depth,
            show_default=True,
            help="MLP hidden layers.",
        ),
        click.option(
            "--subset",
            type=click.IntRange(min=1),
            default=None,
            help="Train on a fixed random subset of N training samples.",
        ),
        click.option(
            "--preset",
            type=click.Choice(tuple(PRESETS)),
            default=None,
            help=f"Settings by name ({_presets_help()}); options given explicitly win over it.",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Where the dataset's files are (fashion-mnist defaults to "
            "/usr/share/datasets/fashion-mnist).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setting(seeds: int = 1, **kwargs: Any) -> Any:
    """The run's `RunConfig` from the command's options.

    With ``--preset`` the preset sets what it names (model size, batch, lr, weight decay,
    momentum, reduction, epochs); options typed on the command line win over it, as a user
    typing them expects, and the others keep the preset's values.
    """
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in kwargs.items() if k in fields and v is not None}
    preset = given.pop("preset", None)
    if preset is None:
        return RunConfig(**given, seeds=seeds)
    ctx = click.get_current_context(silent=True)
    typed = {
        k: v
        for k, v in given.items()
        if ctx is None or ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE
    }
    # Options the preset does not name (dataset, subset, data dir) keep their values.
    kept = {k: v for k, v in given.items() if k not in PRESETS[preset]}
    return RunConfig.from_preset(preset, **{**kept, **typed}, seeds=seeds)


@click.command()
@_training_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="The trace to write (.h5); required unless --no-record.",
)
@click.option(
    "--no-record",
    "no_record",
    is_flag=True,
    help="Train the same run without recording (no trace): the baseline for the "
    "recorder's cost, compare its seconds with a recorded run's.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing trace.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where to train: cpu, cuda, cuda:1, mps (the trace is the same).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (none when not a terminal).")
@frame_output
def train(
    seed: int,
    out: str | None,
    no_record: bool,
    overwrite: bool,
    device: str,
    quiet: bool,
    **kwargs: Any,
) -> pl.DataFrame:
    """Train a model on a named dataset and record every sample's gradients.

    Example: samplescope train --dataset fashion-mnist --preset paper --epochs 5 --out run.h5

    The same run without recording, for the recorder's cost per epoch:
    samplescope train --dataset fashion-mnist --preset paper --epochs 5 --no-record
    """
    import torch

    from samplescope.experiments.train import train_run

    if no_record and out is not None:
        msg = "--no-record writes no trace: drop --out (or drop --no-record)"
        raise CommandError(msg)
    if not no_record and out is None:
        msg = "--out is required (the trace to write), or pass --no-record to train without one"
        raise CommandError(msg)
    if out is not None and Path(out).exists() and not overwrite:
        msg = f"trace {out} already exists; choose another --out or pass --overwrite"
        raise CommandError(msg)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as error:
        msg = f"--device {device!r} is not usable here: {one_line(error)}"
        raise CommandError(msg) from None
    setting = _setting(**kwargs)
    data = setting.load()
    result = train_run(
        setting.with_seed(seed),
        out,
        data=data,
        train_indices=setting.train_ids(data),
        overwrite=overwrite,
        # The bar goes to stderr; off under -q and when stderr is not a terminal (CI, pipes).
        progress=not quiet and sys.stderr.isatty(),
        device=device,
    )
    return pl.DataFrame(
        {
            "trace": [str(out) if out is not None else ""],
            "epochs": [setting.epochs],
            "test_accuracy": [result.test_accuracy[-1]],
            "test_loss": [result.test_loss[-1]],
            "seconds": [round(result.seconds, 3)],
        }
    )


@click.group()
def experiment() -> None:
    """Reproduce the paper's experiments on a named dataset (small settings by flags)."""


def _experiment_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--out-dir",
        type=click.Path(file_okay=False),
        default="experiments",
        show_default=True,
        help="Where traces, CSV tables and figures go.",
    )(func)
    func = click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)(func)
    return _training_options(func)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        msg = f"{name} takes comma-separated numbers like 0.1,0.2, not {text!r}"
        raise _BadOptionError(msg) from None


@experiment.command("findings")
@_experiment_options
@click.option("--time-plain", is_flag=True, help="Also time the same run without recording.")
@frame_output
def experiment_findings(out_dir: str, time_plain: bool, **kwargs: Any) -> pl.DataFrame:
    """Train with recording and check the paper's claims (findings.csv in --out-dir).

    Example: samplescope experiment findings --dataset fashion-mnist --epochs 10
    """
    from samplescope.experiments.findings_run import run_findings

    run = run_findings(_setting(**kwargs), out_dir, time_plain=time_plain)
    for line in run.headlines:
        click.echo(line, err=True)
    plain = "" if run.plain_seconds is None else f", {run.plain_seconds:.1f} s without"
    click.echo(
        f"test accuracy {run.test_accuracy:.4f}; trained in {run.recorded_seconds:.1f} s "
        f"with recording{plain}",
        err=True,
    )
    return run.table


@experiment.command("batches")
@_experiment_options
@frame_output
def experiment_batches(out_dir: str, **kwargs: Any) -> pl.DataFrame:
    """Compare batch constructions: the paper's seven, reshuffling, online by loss/importance.

    Writes batches.csv and batches.pdf (test accuracy per epoch per strategy) to --out-dir.

    Example: samplescope experiment batches --dataset digits --seeds 3 --epochs 10
    """
    from samplescope.experiments.batching import run_batches

    summary, _ = run_batches(_setting(**kwargs), out_dir)
    return summary


@experiment.command("noise")
@_experiment_options
@click.option(
    "--noise",
    "noise",
    default="0.1,0.2",
    show_default=True,
    help="Fractions of training labels to flip.",
)
@frame_output
def experiment_noise(out_dir: str, noise: str, **kwargs: Any) -> pl.DataFrame:
    """Flip labels, record, and report every score's AUROC and AP at finding them.

    Example: samplescope experiment noise --dataset digits --noise 0.1,0.2
    """
    from samplescope.experiments.noise import run_noise

    return run_noise(_setting(**kwargs), out_dir, _floats(noise, "--noise"))


@experiment.command("prune")
@_experiment_options
@click.option(
    "--keep",
    default="0.5,0.7,0.9",
    show_default=True,
    help="Fractions of the training set to keep.",
)
@click.option(
    "--scores",
    default=None,
    help="Comma-separated scores to prune by [default: random, importance-based "
    "and every baseline].",
)
@frame_output
def experiment_prune(out_dir: str, keep: str, scores: str | None, **kwargs: Any) -> pl.DataFrame:
    """Retrain on the subsets each score keeps (hardest first) and at random.

    Example: samplescope experiment prune --dataset digits --keep 0.5,0.9
    """
    from samplescope.experiments.prune import DEFAULT_PRUNE_SCORES, run_prune

    names = tuple(s.strip() for s in scores.split(",")) if scores else DEFAULT_PRUNE_SCORES
    return run_prune(_setting(**kwargs), out_dir, _floats(keep, "--keep"), names)
