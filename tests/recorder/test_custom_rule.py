"""The public way to register a rule: the example in docs/recorder.md, run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from samplescope.recorder import LayerRegistry, Rule, default_registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recorder.md"


def _example() -> str:
    text = DOCS.read_text()
    section = text[text.index("### Custom layer rules") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "docs/recorder.md lost its custom-rule example"
    return match.group(1)


def test_the_documented_example_runs_and_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    namespace: dict = {"__name__": "docs_example"}
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(_example(), str(DOCS), "exec"), namespace)
    finally:
        os.chdir(cwd)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with h5py.File(tmp_path / "custom.h5", "r") as f:
        names = [n.decode() for n in f["layers/name"][:]]
        methods = dict(zip(names, (m.decode() for m in f["layers/method"][:]), strict=True))
        grad_sq = f["visits/grad_sq"][:, names.index("1")]
    assert methods["1"] == "identity"  # the registered rule, not the fallback
    expected = []
    for i in range(8):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, model[1].weight)
        expected.append(float(g.square().sum()))
    np.testing.assert_allclose(grad_sq, expected, rtol=1e-5)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _norms(module: nn.Module, activation: torch.Tensor, grad: torch.Tensor) -> dict:
    return {"weight": (grad * activation).square().sum(1)}


def test_register_by_import_path_matches_the_class_and_its_subclasses() -> None:
    registry = LayerRegistry()
    registry.register(f"{Gate.__module__}.{Gate.__qualname__}", _norms)

    class SubGate(Gate):
        pass

    assert registry.lookup(Gate()) is not None
    assert registry.lookup(SubGate()) is registry.lookup(Gate())
    assert registry.lookup(nn.Linear(2, 2)) is None


def test_a_class_rule_wins_over_a_name_at_the_same_class() -> None:
    registry = LayerRegistry()
    by_name = Rule(lambda *a: None)
    by_class = Rule(lambda *a: None)
    registry.register(f"{Gate.__module__}.{Gate.__qualname__}", by_name)
    registry.register(Gate, by_class)
    assert registry.lookup(Gate()) is by_class


@pytest.mark.parametrize(
    ("cls", "rule", "message"),
    [
        ("Gate", _norms, "import path"),
        (int, _norms, "nn.Module subclass"),
        (Gate, "not callable", "Rule or a norm function"),
    ],
)
def test_bad_registrations_are_type_errors(cls: object, rule: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        default_registry().register(cls, rule)
