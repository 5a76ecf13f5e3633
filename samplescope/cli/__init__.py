"""The `samplescope` command: a thin skin over the Python API.

Each command module exposes ``register(group)``. User mistakes raised as
`SamplescopeError` become a one-line ``Error: ...`` and exit status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from samplescope import __version__
from samplescope.cli.output import CommandError, one_line
from samplescope.errors import SamplescopeError

__all__ = ["main"]

_COMMAND_MODULES = (
    "samplescope.cli.trace_cmds",
    "samplescope.cli.report_cmds",
    "samplescope.cli.demo_cmds",
    "samplescope.cli.experiment_cmds",
    "samplescope.cli.findings_cmds",
    "samplescope.cli.push_cmds",
    "samplescope.cli.export_cmds",
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SamplescopeError as error:
            raise CommandError(one_line(error)) from None
        except OSError as error:
            # Unwritable outputs, full disks: the user's environment, not a bug.
            raise CommandError(one_line(error)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="samplescope")
def main() -> None:
    """Which training samples move which parameters, and when.

    Record a run with `samplescope.Recorder` (or `samplescope train`), then query and
    report it:

    \b
        samplescope demo --out samplescope-demo/
        samplescope info run.h5
        samplescope samples run.h5 --sort importance --top 20
        samplescope report run.h5 -o report.pdf
    """


for _name in _COMMAND_MODULES:
    # Torch-using commands import torch inside their functions, so `info` stays fast.
    importlib.import_module(_name).register(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
