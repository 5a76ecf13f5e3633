"""RunConfig (the one config) and train_run's hooks (the one loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samplescope.experiments.config import PRESETS, ExperimentError, RunConfig
from samplescope.experiments.data import load_dataset
from samplescope.experiments.train import TrainHook, train_run


def test_a_preset_sets_every_field_it_names_and_overrides_win() -> None:
    paper = RunConfig.paper()
    for key, value in PRESETS["paper"].items():
        assert getattr(paper, key) == value, key
    assert paper.preset == "paper"
    chosen = RunConfig.from_preset("paper", epochs=3, lr=0.05, dataset="mnist1d")
    assert (chosen.epochs, chosen.lr, chosen.dataset) == (3, 0.05, "mnist1d")
    assert (chosen.momentum, chosen.reduction, chosen.weight_decay) == (0.0, "mean", 1e-5)


def test_a_presets_momentum_and_reduction_reach_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "heavy", {"momentum": 0.9, "reduction": "sum", "lr": 0.01})
    config = RunConfig.from_preset("heavy").with_seed(3)
    assert (config.momentum, config.reduction, config.seed, config.preset) == (
        0.9,
        "sum",
        3,
        "heavy",
    )
    stored = config.stored()
    assert (stored["momentum"], stored["reduction"]) == (0.9, "sum")
    assert not {"subset", "seeds", "data_dir"} & stored.keys()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"preset": "nope"}, "unknown preset"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"model": "resnet"}, "unknown model"),
        ({"reduction": "max"}, "unknown reduction"),
        ({"epochs": 0}, "at least 1"),
        ({"seeds": 0}, "at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ExperimentError, match=words):
        RunConfig(**kwargs)
    with pytest.raises(ExperimentError, match="unknown preset"):
        RunConfig.from_preset("nope")


class Counting(TrainHook):
    def __init__(self) -> None:
        self.attached = self.detached = 0
        self.steps: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []

    def attach(self, model: torch.nn.Module) -> None:
        self.attached += 1

    def after_step(self, ids: np.ndarray, losses: torch.Tensor, logits: torch.Tensor) -> None:
        self.steps.append((ids, losses, logits))

    def detach(self) -> None:
        self.detached += 1


def test_train_run_calls_every_hook_around_and_after_each_step() -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    config = RunConfig(epochs=2, batch_size=100, hidden=8, depth=1)
    ids = np.arange(250)
    hook = Counting()
    plan = [ids[:100], ids[100:250]]
    result = train_run(
        config, None, data=data, train_indices=ids, batch_plan=lambda e, rng: plan, hooks=[hook]
    )
    assert (hook.attached, hook.detached) == (1, 1)
    assert [len(i) for i, _, _ in hook.steps] == [100, 150, 100, 150]
    for ids_seen, losses, logits in hook.steps:
        assert not losses.requires_grad
        assert logits.shape == (len(ids_seen), 10)
    assert len(result.test_accuracy) == 2


def test_hooks_are_detached_when_training_fails() -> None:
    data = load_dataset("digits")
    hook = Counting()

    def broken(epoch: int, rng: np.random.Generator) -> list[np.ndarray]:
        msg = "plan failed"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="plan failed"):
        train_run(RunConfig(hidden=8, depth=1), None, data=data, batch_plan=broken, hooks=[hook])
    assert (hook.attached, hook.detached) == (1, 1)
