"""Every package folder is installed, under the samplescope import package."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {
    "samplescope": "samplescope",
    "recorder": "samplescope.recorder",
    "analysis": "samplescope.analysis",
    "reports": "samplescope.reports",
}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in MAPPED.items()}
