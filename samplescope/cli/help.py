"""Help texts that list names from the registries, so no list is copied by hand.

`ListedOption` fills ``{names}`` in its help from a function called only when the help is
shown: a registry that is slow to import (the report's sections import matplotlib) costs
nothing at startup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click

__all__ = ["ListedOption", "listed"]


class ListedOption(click.Option):
    """A click option whose help's ``{names}`` is the comma-separated ``names()``."""

    def __init__(self, *args: Any, names: Callable[[], Iterable[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._names = names
        self._template = self.help or ""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self._template.format(names=listed(self._names()))
        return super().get_help_record(ctx)


def listed(names: Iterable[str]) -> str:
    """``a, b, c``."""
    return ", ".join(names)
