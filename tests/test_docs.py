"""Everything a user can name is documented and listed in its help (after sqlite-utils'
test_docs.py).

Data-driven: the commands come from walking the click group, the tables from
`analysis.trace.TABLES`, the report's pages from `reports.SECTIONS`, the datasets, models and
presets from `experiments.config`, flag kinds from `analysis.flags.KINDS`. A new command,
table, page or name is checked here without editing this file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from samplescope.analysis.flags import KINDS
from samplescope.analysis.trace import TABLES
from samplescope.cli import main
from samplescope.experiments.config import DATASETS, MODELS, PRESETS
from samplescope.reports import SECTIONS
from samplescope.reports._section import Section

ROOT = Path(__file__).resolve().parents[1]
DOCS = {p.name: p.read_text() for p in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]}


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = [" ".join(p) for p in _commands(main)]


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    # Wrapped help joins back into one line per option for substring checks.
    return re.sub(r"\s+", " ", result.output)


def _documented(pattern: str, files: tuple[str, ...] | None = None) -> list[str]:
    return [
        name
        for name, text in DOCS.items()
        if (files is None or name in files) and re.search(pattern, text)
    ]


def test_the_lists_are_not_empty() -> None:
    # A broken walk or import would make every test below pass vacuously.
    assert {"info", "sql", "report", "train", "experiment prune"} <= set(COMMANDS)
    assert len(TABLES) >= 10
    assert len(SECTIONS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented(command: str) -> None:
    assert _documented(rf"samplescope {re.escape(command)}\b"), (
        f"`samplescope {command}` appears in no docs/*.md nor README.md"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_listed_in_its_groups_help_with_an_example(command: str) -> None:
    *parent, name = command.split()
    assert re.search(rf"\b{re.escape(name)}\b", _help(*parent).split("Commands:")[-1])
    command_help = _help(*command.split())
    group = isinstance(
        main.get_command(click.Context(main), command.split(maxsplit=1)[0]), click.Group
    )
    if not (group and len(command.split()) == 1):
        assert "Example: samplescope " + command in command_help


@pytest.mark.parametrize("table", TABLES)
def test_every_table_is_documented_and_listed(table: str) -> None:
    assert _documented(rf"`{table}`", ("analysis.md",)), f"table {table} not in docs/analysis.md"
    assert table in _help("schema").split("-t, --table")[1].split(" --")[0]


@pytest.mark.parametrize("page", [s.id for s in SECTIONS])
def test_every_report_page_is_documented_and_listed(page: str) -> None:
    assert _documented(rf"`{page}`", ("report.md",)), f"page {page} not in docs/report.md"
    pages_help = _help("report").split("Options:")[1].split("--pages")[1].split(" --")[0]
    assert re.search(rf"\b{page}\b", pages_help), f"report --help does not list {page}"


@pytest.mark.parametrize(
    ("option", "name"),
    [("--dataset", d) for d in DATASETS]
    + [("--model", m) for m in MODELS]
    + [("--preset", p) for p in PRESETS],
)
def test_every_dataset_model_and_preset_is_documented_and_listed(option: str, name: str) -> None:
    for command in ("train", "experiment findings"):
        assert re.search(rf"{option} \[[^\]]*\b{re.escape(name)}\b", _help(*command.split()))
    assert _documented(rf"\b{re.escape(name)}\b", ("experiments.md", "README.md"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_flag_kind_is_documented_and_listed(kind: str) -> None:
    assert re.search(rf"--kind \[[^\]]*\b{kind}\b", _help("flag"))
    assert _documented(rf"--kind [\w|]*\b{kind}\b")


@pytest.mark.parametrize(("number", "section"), list(enumerate(SECTIONS, 1)))
def test_section_docstrings_number_the_pages_in_report_order(number: int, section: Section) -> None:
    doc = sys.modules[section.pages.__module__].__doc__ or ""
    assert doc.startswith(f"Section {number}, "), (
        f"{section.pages.__module__} is section {number} in reports.SECTIONS; its docstring "
        f"starts {doc[:30]!r}"
    )


def test_the_number_of_conv_methods_is_the_one_documented() -> None:
    from samplescope.recorder.layers import conv

    words = {3: "three", 4: "four", 5: "five", 6: "six"}
    count = words[len(conv.CONV_METHODS)]
    assert f"{count} exact methods" in DOCS["recorder.md"]
    assert f"{count.capitalize()} exact ways" in (conv.__doc__ or "")
    for name in conv.CONV_METHODS:
        assert f"``{name}``" in (conv.__doc__ or ""), name
